"""The physics of the synthetic jet images: `simulate(process, n, rng)` -> images (n, 8, 125, 125) and labels.

Pure and vectorised over events, no I/O: decays, parton showers, underlying event, pileup, secondary
interactions in the tracker material, and the detector response (tracker, ECAL, HCAL, noise, zero
suppression). `pipeline.synth` writes what `simulate` returns as Parquet and re-exports the public names;
`pipeline.synth_report` compares the result with the real data and records the calibration against it.

Geometry. A pixel is one ECAL barrel crystal, 0.0174 x 0.0174 in (eta, phi). The image is 125 x 125 pixels,
rows = eta, columns = phi, centred on the parent's direction (pixel 62 holds the axis), so it spans about
+-1.09 in both; whatever falls outside is lost. HCAL towers are the 5 x 5 pixel blocks of the image grid
(tower = pixel // 5). The labels are the HCAL tower indices of the parent axis, `ieta = floor(eta / 0.087)
+ 28` and `iphi = floor(phi / (2 pi / 72))` with phi uniform in [0, 2 pi), written as float64.

`top`: parent mass m flat in 85-500 GeV, pT flat in 400-1000 GeV, eta flat in |eta| < 1.392 (16 towers
either side, so that ieta is 12..43 as in the real data; the real files say |eta| < 1.4), phi flat.
  * t -> b W with m_b = 4.8 GeV and m_W from a Breit-Wigner (80.4, width 2.1) truncated to 1 < m_W < m - m_b
    (sampled exactly by inverting its CDF); W -> q q' (massless). Two-body decays are isotropic in the rest
    frame and boosted to the lab with vectorised 4-vector maths; the opening angle is about 2 m / pT, so at
    high m and low pT part of the jet falls outside the image: a physical error floor, as in the real data.
    How hard that makes it (4,096 events written with seed 5, i.e. chunk_rng(5, 0, i) for 16 chunks of 256):
    the invariant mass of the ECAL + HCAL pixels has Pearson 0.79 with m where 2 m / pT < 1 (63 % of events),
    0.55 over all (wide decays often lose the b or the W whole); a 30-nearest-neighbour regression of m on
    that pixel mass alone (2-fold: fitted on one half, scored on the other, and back) scores a mean absolute
    error of 58 GeV against 103 GeV for a constant (before the calibration in `pipeline.synth_report`:
    0.79 / 0.54 and 55 GeV), near the best public numbers on the real data (46-55 vs 104).
  * Each of the 3 partons showers into N ~ Poisson(clip(2 + 2.5 ln E, 4, 20)) massless particles (at most 32,
    a fixed maximum with a mask keeps it vectorised) with energy fractions from a Dirichlet(0.7) and a
    Gaussian spread in (eta, phi) around the parton of clip(0.5 / sqrt(E / GeV), 0.01, 0.1) rad, wider for
    softer particles (x (z N)^-0.3, at most x3). Momentum is not conserved exactly inside a shower (the
    spread adds a little mass), as a real shower adds some.
  * Species: 60 % charged hadrons, 25 % photons (pi0), 15 % neutral hadrons; charge +-1 at random.
  * A few soft underlying-event particles (Poisson mean 8; pT 0.3 GeV + Exp(0.7 GeV)), uniform over the image.
  * Pileup, secondary interactions and the detector: below, shared with `a2gg`.

`a2gg`: A -> gamma gamma with m flat in 0-2 GeV, pT flat in 10-150 GeV, |eta| < 2, phi flat: two photons
(merged into one cluster at high boost) and a few soft underlying-event particles (Poisson mean 3). The
ranges are wider than the paper's cuts (pT 20-100, m < 1.6, |eta| < 1.4: 0.571 x 0.8 x 0.7 = 0.32 of the
events pass them) so that the converter's cuts remove a known fraction. ieta therefore runs over 5..50,
outside the barrel's 12..43; the detector is treated as one barrel everywhere (no endcap).

Environment, the same for both processes (`with_environment`); none of it depends on the mass label:
  * Pileup (`pileup`): Poisson 15 particles per image from other pp collisions, uniform over the image, soft
    pT (0.1 GeV + a Lomax tail ~ pT^-6, mean 0.5 GeV: 19 % reach the ECAL, 11 % pass 1 GeV), species as
    above. Each comes from its own vertex at z ~ N(0, 5 cm), as does the event's primary vertex, so its
    track has dz = z - z_pv ~ N(0, 7 cm) and a prompt d0. Fifteen per image is what the real pixel-layer
    occupancy (0.2 %) leaves room for beside the jet's own charged particles (a full 2012 pileup of ~20
    collisions would put ~90 charged particles in the image).
  * Secondary interactions in the tracker material (`secondaries`), at a radius R ~ U(3, 65 cm): every prompt
    hadron interacts with probability 0.15 into 1 + Poisson(1.5) soft charged fragments (pT as pileup, at
    most 0.9 of the parent's, at angles ~ N(0, min(1, 0.5 GeV / pT)) to the parent in phi and theta), every
    photon converts with probability 0.35 into an e+ e- pair sharing its pT (z, 1 - z, z uniform;
    collinear). A fragment's d0 is the distance of closest approach of its helix (from R, bent in 3.8 T) to
    the beam line, R sin(angle) for a straight track and ~0.57 R^2 / pT (m, GeV) for a radial one: cm,
    tens of them for soft tracks from large R; dz = R (sinh eta_parent - sinh eta). Fragments leave no
    pixel hit in layers inside R and no calorimeter energy of their own (it is the parent's, already there).

Detector response, the same for both processes:
  * Charged particles bend in phi by asin(0.3 * 3.8 T * r / (2 pT)) at radius r (opposite ways for the two
    charges). Pixel hits at r = 4.4, 7.3, 10.2 cm, one per layer with efficiency 0.97, for particles made
    inside that radius. Tracks (pT > 0.3 GeV, efficiency 0.95) are drawn at their position on the ECAL surface
    (r = 1.29 m); loopers with pT below 0.735 GeV never reach it and are drawn at their direction at the
    vertex (how the real images place them is not known). dz and d0: the displacement above plus the prompt
    resolution N(0, 0.002 + 0.008 / pT cm); the charged daughters of the b quark are displaced by a further
    +-Exp(0.05 cm). Where tracks share a pixel, channel 0 holds the sum of their pT and channels 1-2 the
    pT-weighted mean of dz / d0.
  * Calorimeters (all at the ECAL-surface position): photons shower in ECAL, 80 % in the central crystal,
    15 % over the 8 crystals around it, 5 % over the 16 of the next ring (no dependence on the impact point).
    A hadron (charged or neutral) starts showering in ECAL with probability 0.6 (ECAL is ~1 interaction length
    deep), leaving a uniform 10-60 % of its energy there spread over 9 x 9 crystals ~ exp(-d / 1.5 crystals);
    otherwise a charged hadron leaves a MIP (0.25 GeV + Exp(0.05)) in one crystal. The rest goes to HCAL, 90 %
    in its tower and 10 % over the 8 around (lateral leakage). Hadron showers show 0.7 of their energy
    (non-compensation; uncalibrated, as rechits are). Resolution per particle: ECAL 3 %/sqrt(E) (+) 0.5 %,
    hadron showers 100 %/sqrt(E) (+) 5 % (Gaussian, cut at 0).
  * Noise and zero suppression: Gaussian noise of 0.035 GeV per crystal (2.9 sigma under the 0.1 GeV
    suppression: ~30 noise crystals per image), crystals under 0.1 GeV set to exactly 0; 0.15 GeV per HCAL
    tower, towers under 0.5 GeV set to 0. Every energy left is far above 1e-3 of the channel's reference
    scale (`pipeline.layout.REFERENCE_SCALES`). Images are sparse: > 90 % of the pixels are exactly 0.


Left out on purpose: pi0 -> gamma gamma splitting, electrons (conversion legs are tracks only), b-hadron decay
kinematics (only the displacement), out-of-time pileup (other bunch crossings), secondaries of secondaries,
energy taken from a parent by its secondaries, endcaps, and momentum conservation inside a shower.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import UserError
from pipeline.layout import CHANNEL_NAMES, IMAGE_SIZE

PROCESSES = ("top", "a2gg")

# Geometry (see the module docstring).
PIX = 0.0174                   # one ECAL crystal in eta and in phi
HALF = IMAGE_SIZE / 2          # 62.5: floor(d / PIX + HALF) puts the axis in pixel 62
TOWER = 5                      # an HCAL tower is 5 x 5 crystals
TOWER_ETA = 0.087              # ieta label = floor(eta / TOWER_ETA) + 28
TOWER_PHI = 2 * np.pi / 72     # iphi label = floor(phi / TOWER_PHI), 0..71
TOP_ETA_MAX = 16 * TOWER_ETA   # 1.392: ieta in 12..43
R_PIXEL = np.array([0.044, 0.073, 0.102])  # barrel pixel layer radii (m)
R_ECAL = 1.29                  # ECAL surface radius (m)
K_BEND = 0.3 * 3.8 / 2         # GeV/m: a track of pT turns by asin(K_BEND * r / pT) at radius r in 3.8 T

# Particle species.
CHARGED, PHOTON, NEUTRAL = 0, 1, 2
SPECIES_P = (0.60, 0.25, 0.15)

# Pileup and secondary interactions (see the module docstring; tuned to the real data's statistics:
# docs/data.md, "The published statistics").
PILEUP_MEAN = 15.0             # pileup particles per image (Poisson); pixel-layer occupancy bounds it
SIGMA_Z = 5.0                  # cm, length of the luminous region: vertex z ~ N(0, SIGMA_Z)
P_NUCLEAR = 0.15               # probability that a hadron interacts in the tracker material (r < R_SEC[1])
P_CONVERSION = 0.35            # probability that a photon converts there
R_SEC = (0.03, 0.65)           # m, radii of secondary vertices: beam pipe to the inner strip layers
# Calorimeters (energies in GeV)
P_EARLY = 0.6                  # probability that a hadron starts showering in ECAL
HAD_RESPONSE = 0.7             # non-compensation: a hadron shower shows this fraction of its energy
ECAL_NOISE, ECAL_ZS = 0.035, 0.1       # per crystal: Gaussian noise, zero suppression
HCAL_NOISE, HCAL_ZS = 0.15, 0.5        # per tower
HCAL_CORE = 0.9                # fraction of a hadron's HCAL energy in its own tower; the rest in the 8 around

CH = {name: i for i, name in enumerate(CHANNEL_NAMES)}


class SynthError(UserError, ValueError):
    """Bad configuration or output directory; the message is one line and says what to do. Defined here, at
    the bottom of the three synth modules, so that all of them raise the one type. (Still a ValueError too,
    as it was before UserError existed, for callers that catch that.)"""


# ----------------------------------------------------------------------------------------------------------
# 4-vector helpers: arrays (..., 4) = (E, px, py, pz), GeV
# ----------------------------------------------------------------------------------------------------------

def four_vector(pt, eta, phi, m) -> np.ndarray:
    """(..., 4) from pT, eta, phi, mass (broadcast)."""
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    e = np.sqrt(px ** 2 + py ** 2 + pz ** 2 + np.asarray(m) ** 2)
    return np.stack(np.broadcast_arrays(e, px, py, pz), axis=-1)


def two_body(parent: np.ndarray, mass, m1, m2, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Isotropic two-body decays of parents (n, 4) of mass `mass` into masses m1, m2 ((n,) or scalars).

    Returns the daughters' 4-vectors (n, 4) in the parents' frame. The rest-frame energies and momentum enter
    only as fractions of the parent mass, and the boost is written with the parent's 4-vector P rather than
    its velocity: E = E_P e + s p (P.n), p = s p M n + P (e + s p (P.n) / (E_P + M)) with e = E*/M, p = p*/M,
    s = +-1. A (nearly) massless parent (a2gg at m -> 0) then splits collinearly instead of dividing 0 by 0.
    """
    n = parent.shape[0]
    mass, m1, m2 = (np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for v in (mass, m1, m2))
    safe = np.where(mass > 0, mass, 1.0)
    a, b = (m1 + m2) / safe, (m1 - m2) / safe
    p_frac = 0.5 * np.sqrt(np.maximum((1 - a ** 2) * (1 - b ** 2), 0.0))  # (n,) p* / M, 1/2 if massless
    e_frac = 0.5 * (1 + a * b)                                           # (n,) E1* / M
    cos_t = rng.uniform(-1.0, 1.0, n)
    phi = rng.uniform(0.0, 2 * np.pi, n)
    sin_t = np.sqrt(1.0 - cos_t ** 2)
    direction = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], axis=-1)  # (n, 3) unit vector
    e_p, vec_p = parent[:, 0], parent[:, 1:]
    pn = np.sum(vec_p * direction, axis=-1)                              # (n,) P . n
    out = []
    for e_d, sign in ((e_frac, 1.0), (1.0 - e_frac, -1.0)):
        sp = sign * p_frac
        energy = e_p * e_d + sp * pn
        vec = (sp * mass)[:, None] * direction + vec_p * (e_d + sp * pn / (e_p + mass))[:, None]
        out.append(np.concatenate([energy[:, None], vec], axis=-1))
    return out[0], out[1]


def eta_phi(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pseudorapidity and azimuth of 4-vectors (..., 4)."""
    pt = np.hypot(p[..., 1], p[..., 2])
    return np.arcsinh(p[..., 3] / np.maximum(pt, 1e-12)), np.arctan2(p[..., 2], p[..., 1])


def wrap(dphi: np.ndarray) -> np.ndarray:
    """Azimuth difference folded into [-pi, pi)."""
    return (dphi + np.pi) % (2 * np.pi) - np.pi


def tower_labels(eta: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ieta = floor(eta / 0.087) + 28 and iphi = floor(phi / (2 pi / 72)) as float64 (phi in [0, 2 pi))."""
    ieta = np.floor(eta / TOWER_ETA) + 28
    iphi = np.minimum(np.floor(np.mod(phi, 2 * np.pi) / TOWER_PHI), 71)  # 2 pi - tiny rounds to 72.0
    return ieta.astype(np.float64), iphi.astype(np.float64)


def truncated_breit_wigner(mean: float, width: float, lo, hi, rng: np.random.Generator) -> np.ndarray:
    """Exact samples of a Breit-Wigner (Cauchy) truncated to [lo, hi] (arrays), by inverting its CDF."""
    a, b = np.arctan((lo - mean) / (width / 2)), np.arctan((hi - mean) / (width / 2))
    return mean + width / 2 * np.tan(rng.uniform(a, b))


# ----------------------------------------------------------------------------------------------------------
# Particles: flat arrays, one entry per particle of the chunk
# ----------------------------------------------------------------------------------------------------------

def _particles(ev, eta, phi, e, species, charge, *, dz=None, d0=None, r0=None,
               calo=None) -> dict[str, np.ndarray]:
    """Flat particle arrays. dz / d0 (cm): displacement of the track beyond the prompt resolution; r0 (m):
    production radius (pixel layers inside it see no hit); calo: whether the particle deposits energy (False
    for secondaries, whose energy is the parent's and is already in the calorimeters)."""
    zeros = np.zeros(ev.shape[0])
    return {"ev": ev.astype(np.int64), "eta": eta, "phi": phi, "e": e, "species": species.astype(np.int8),
            "charge": charge.astype(np.int8), "dz": zeros if dz is None else dz,
            "d0": zeros if d0 is None else d0, "r0": zeros if r0 is None else r0,
            "calo": np.ones(ev.shape[0], bool) if calo is None else calo.astype(bool)}


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _species(shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    species = rng.choice(3, size=shape, p=SPECIES_P)
    charge = np.where(species == CHARGED, rng.choice(np.array([-1, 1]), size=shape), 0)
    return species, charge


def shower(partons: np.ndarray, displaced: np.ndarray, rng: np.random.Generator, k_max: int = 32) -> dict:
    """Fragment partons (n, P, 4) into massless particles; `displaced` (P,) marks b quarks, whose charged
    daughters get displaced tracks. Vectorised: every parton gets k_max slots, a mask keeps N of them."""
    n, n_partons = partons.shape[:2]
    e = np.maximum(partons[..., 0], 1e-3)                               # (n, P)
    eta, phi = eta_phi(partons)                                         # (n, P)
    mult = np.clip(rng.poisson(np.clip(2 + 2.5 * np.log(np.maximum(e, 1.0)), 4, 20)), 1, k_max)  # (n, P)
    active = np.arange(k_max) < mult[..., None]                         # (n, P, K)
    g = rng.gamma(0.7, size=active.shape) * active                      # Dirichlet(0.7) over the active slots
    z = g / np.maximum(g.sum(-1, keepdims=True), 1e-300)                # (n, P, K) energy fractions
    # softer particles spread wider: factor (z N)^-0.3, 1 for an average particle, at most 3
    soft = np.minimum(np.maximum(z * mult[..., None], 1e-6) ** -0.3, 3.0)
    sigma = np.clip(0.5 / np.sqrt(e), 0.01, 0.1)[..., None] * soft     # (n, P, K) rad
    p_eta = eta[..., None] + sigma * rng.standard_normal(active.shape)
    p_phi = phi[..., None] + sigma * rng.standard_normal(active.shape)
    p_e = z * e[..., None]
    species, charge = _species(active.shape, rng)
    ev = np.broadcast_to(np.arange(n)[:, None, None], active.shape)
    disp = np.broadcast_to(np.asarray(displaced, bool)[None, :, None], active.shape)
    keep = active & (p_e > 0)
    # charged b daughters: flight of the b hadron, +-Exp(0.05 cm) in dz and in d0
    flight = disp[keep] & (species[keep] == CHARGED)
    n_k = int(keep.sum())
    dz, d0 = (np.where(flight, rng.choice([-1.0, 1.0], n_k) * rng.exponential(0.05, n_k), 0.0)
              for _ in range(2))
    return _particles(ev[keep], p_eta[keep], p_phi[keep], p_e[keep], species[keep], charge[keep],
                      dz=dz, d0=d0)


def _uniform_in_image(axis_eta: np.ndarray, axis_phi: np.ndarray, count: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Event index, eta and phi of `count` (per event) particles uniform over each event's image window."""
    ev = np.repeat(np.arange(axis_eta.shape[0]), count)
    half = HALF * PIX
    eta = axis_eta[ev] + rng.uniform(-half, half, ev.size)
    return ev, eta, axis_phi[ev] + rng.uniform(-half, half, ev.size)


def underlying_event(axis_eta: np.ndarray, axis_phi: np.ndarray, mean: float,
                     rng: np.random.Generator) -> dict:
    """Soft particles (Poisson `mean` per event) uniform over each event's image window."""
    ev, eta, phi = _uniform_in_image(axis_eta, axis_phi, rng.poisson(mean, size=axis_eta.shape[0]), rng)
    pt = 0.3 + rng.exponential(0.7, ev.size)
    species, charge = _species(ev.shape, rng)
    return _particles(ev, eta, phi, pt * np.cosh(eta), species, charge)


def soft_pt(size: int, rng: np.random.Generator) -> np.ndarray:
    """Minimum-bias-like pT spectrum (GeV): 0.1 + a Lomax tail ~ pT^-6, mean 0.5, 19 % above 0.735 GeV
    (enough to reach the ECAL), 11 % above 1 GeV."""
    return 0.1 + 1.6 * rng.pareto(5.0, size)


def pileup(axis_eta: np.ndarray, axis_phi: np.ndarray, mean: float, rng: np.random.Generator) -> dict:
    """Particles of other pp collisions (Poisson `mean` per image), uniform over the image, soft pT; each from
    its own vertex at z ~ N(0, SIGMA_Z), so its track's dz (measured from the event's primary vertex, also at
    z ~ N(0, SIGMA_Z)) is of centimetres. Independent of the hard process, hence of the mass label."""
    n = axis_eta.shape[0]
    z_pv = SIGMA_Z * rng.standard_normal(n)                             # (n,) cm
    ev, eta, phi = _uniform_in_image(axis_eta, axis_phi, rng.poisson(mean, size=n), rng)
    pt = soft_pt(ev.size, rng)
    species, charge = _species(ev.shape, rng)
    dz = SIGMA_Z * rng.standard_normal(ev.size) - z_pv[ev]
    return _particles(ev, eta, phi, pt * np.cosh(eta), species, charge, dz=dz)


def secondaries(parts: dict, rng: np.random.Generator) -> dict:
    """Charged tracks from interactions in the tracker material (a vertex at radius R ~ U(R_SEC), m):
    a hadron interacts with probability P_NUCLEAR and yields 1 + Poisson(1.5) soft charged fragments (pT from
    `soft_pt`, at most 0.9 of the parent's) at angles ~ N(0, min(1, 0.5 GeV / pT)) to it in phi and in theta;
    a photon converts with probability P_CONVERSION into e+ e- sharing its pT (z, 1 - z), collinear.
    A track from R at angle a (transverse) has d0 = R sin a + q K_BEND R^2 / pT (the second term: it bends
    away from the radial line it started on; cm-scale for 1 GeV at 30 cm) and dz = R dtheta cosh^2(eta).
    Fragments start at R, so pixel layers inside it see nothing; their energy is the parent's (calo=False)."""
    n_p = parts["e"].shape[0]
    eta_p, phi_p = parts["eta"], parts["phi"]
    pt_p = parts["e"] / np.cosh(eta_p)
    photon = parts["species"] == PHOTON
    nuclear = ~photon & parts["calo"] & (rng.random(n_p) < P_NUCLEAR)
    conv = photon & (rng.random(n_p) < P_CONVERSION)
    n_d = np.where(nuclear, 1 + rng.poisson(1.5, n_p), 0) + np.where(conv, 2, 0)   # (n_p,) daughters
    src = np.repeat(np.arange(n_p), n_d)                                # (n_d,) parent of each daughter
    first = np.repeat(np.cumsum(n_d) - n_d, n_d)
    k = np.arange(src.size) - first                                     # index of the daughter in its group
    is_conv = conv[src]
    radius = np.repeat(rng.uniform(*R_SEC, n_p), n_d)                   # one vertex per interaction (m)
    z = np.repeat(rng.uniform(0.0, 1.0, n_p), n_d)
    pt = np.where(is_conv, np.where(k == 0, z, 1.0 - z) * pt_p[src],
                  np.minimum(soft_pt(src.size, rng), 0.9 * pt_p[src]))
    pt = np.maximum(pt, 1e-3)
    charge = np.where(is_conv, np.where(k == 0, 1, -1), rng.choice(np.array([-1, 1]), src.size))
    spread = np.where(is_conv, 0.0, np.minimum(1.0, 0.5 / pt))          # rad
    a = np.clip(spread * rng.standard_normal(src.size), -1.4, 1.4)      # transverse angle to the parent
    dtheta = spread * rng.standard_normal(src.size)
    theta_p = 2 * np.arctan(np.exp(-eta_p[src]))
    theta = np.clip(theta_p + dtheta, 0.05, np.pi - 0.05)
    eta = -np.log(np.tan(theta / 2))
    # a straight line from (R, phi_p) at angle a meets the ECAL at phi_p + a - asin(R sin a / R_ECAL)
    phi = phi_p[src] + a - np.arcsin(radius * np.sin(a) / R_ECAL)
    # d0: distance of closest approach of the helix (radius rho = pT / (2 K_BEND)) to the beam line; its
    # centre lies at rho from the start point (R, 0), perpendicular to the direction (cos a, sin a)
    rho = pt / (2 * K_BEND)
    centre = np.hypot(radius - charge * rho * np.sin(a), charge * rho * np.cos(a))
    d0 = 100 * charge * (centre - rho)                                  # cm, R sin a for a straight line
    dz = 100 * radius * (np.sinh(eta_p[src]) - np.sinh(eta))            # cm, straight line back in (r, z)
    return _particles(parts["ev"][src], eta, phi, pt * np.cosh(eta), np.full(src.size, CHARGED), charge,
                      dz=dz, d0=d0, r0=radius, calo=np.zeros(src.size, bool))


# ----------------------------------------------------------------------------------------------------------
# Detector: particles -> (n, 8, 125, 125) images
# ----------------------------------------------------------------------------------------------------------

def _pixel(ev, eta, phi, axis_eta, axis_phi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image row (eta) and column (phi) of each particle, and whether it falls inside the image."""
    row = np.floor((eta - axis_eta[ev]) / PIX + HALF).astype(np.int64)
    col = np.floor(wrap(phi - axis_phi[ev]) / PIX + HALF).astype(np.int64)
    inside = (row >= 0) & (row < IMAGE_SIZE) & (col >= 0) & (col < IMAGE_SIZE)
    return row, col, inside


def _fill(n: int, ev, row, col, weights, inside, size: int = IMAGE_SIZE) -> np.ndarray:
    """Sum weights into (n, size, size) at (ev, row, col), for the entries inside the grid."""
    flat = (ev * size + row) * size + col
    return np.bincount(flat[inside], weights=weights[inside], minlength=n * size ** 2).reshape(n, size, size)


def _em_kernel() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """5 x 5 lateral profile of an EM shower: 80 % central crystal, 15 % first ring, 5 % second ring."""
    d = np.arange(-2, 3)
    di, dj = np.meshgrid(d, d, indexing="ij")
    ring = np.maximum(np.abs(di), np.abs(dj)).ravel()                   # (25,) 0, 1 or 2
    w = np.choose(ring, [0.80, 0.15 / 8, 0.05 / 16])
    return di.ravel(), dj.ravel(), w


def _had_kernel() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """9 x 9 lateral profile of the part of a hadron shower in ECAL: weights ~ exp(-d / 1.5 crystals), d the
    distance from the centre (an interaction length is ~10 crystals deep, a hadron shower is wide)."""
    d = np.arange(-4, 5)
    di, dj = np.meshgrid(d, d, indexing="ij")
    w = np.exp(-np.hypot(di, dj) / 1.5).ravel()
    return di.ravel(), dj.ravel(), w / w.sum()


def _scatter(n: int, ev, row, col, energy, ok, kernel, size: int = IMAGE_SIZE) -> np.ndarray:
    """Spread each particle's energy over a kernel (di, dj, w) of cells around (row, col) of a (size, size)
    grid: one bincount. Cells of the kernel outside the grid are lost; tails of showers centred just outside
    come in (their centre cell may lie outside)."""
    di, dj, w = kernel
    sel = ok & (energy > 0)
    k_row = (row[sel, None] + di).ravel()                               # (n_sel * kernel,)
    k_col = (col[sel, None] + dj).ravel()
    k_ev = np.repeat(ev[sel], di.size)
    k_in = (k_row >= 0) & (k_row < size) & (k_col >= 0) & (k_col < size)
    return _fill(n, k_ev, k_row, k_col, (energy[sel, None] * w).ravel(), k_in, size)


def _tower_kernel() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 x 3 towers: HCAL_CORE of a hadron's HCAL energy in its own tower, the rest shared by the 8 around."""
    d = np.arange(-1, 2)
    di, dj = (a.ravel() for a in np.meshgrid(d, d, indexing="ij"))
    return di, dj, np.where((di == 0) & (dj == 0), HCAL_CORE, (1.0 - HCAL_CORE) / 8)


def _smear(e: np.ndarray, stochastic: float, constant: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian energy resolution sigma/E = stochastic/sqrt(E) (+) constant, cut at 0."""
    rel = np.sqrt(stochastic ** 2 / np.maximum(e, 1e-6) + constant ** 2)
    return np.maximum(e * (1.0 + rel * rng.standard_normal(e.shape)), 0.0)


def render(n: int, axis_eta: np.ndarray, axis_phi: np.ndarray, parts: dict,
           rng: np.random.Generator) -> np.ndarray:
    """Detector response to flat particle arrays: images (n, 8, 125, 125) float64 in GeV / cm / hits.

    The steps draw from `rng` in a fixed order (pixel layers, tracks, calorimeter energies, ECAL noise, HCAL
    noise), so that a chunk's images depend on its seed alone."""
    images = np.zeros((n, len(CHANNEL_NAMES), IMAGE_SIZE, IMAGE_SIZE))
    pt = np.maximum(parts["e"] / np.cosh(parts["eta"]), 1e-12)
    charged = parts["species"] == CHARGED
    _pixel_layers(images, axis_eta, axis_phi, parts, pt, charged, rng)
    # every particle is placed where it meets the ECAL; loopers (pT < 0.735 GeV) never do: their tracks are
    # drawn at their direction at the vertex, and they deposit nothing
    reach_ecal = ~charged | (K_BEND * R_ECAL / pt < 1.0)
    bend = np.where(reach_ecal, parts["charge"] * np.arcsin(np.minimum(K_BEND * R_ECAL / pt, 1.0)), 0.0)
    cell = _pixel(parts["ev"], parts["eta"], parts["phi"] + bend, axis_eta, axis_phi)   # (row, col, inside)
    _tracks(images, parts, pt, charged, cell, rng)
    energies = _calo_energies(parts, charged, rng)
    _ecal(images, parts, reach_ecal, cell, energies, rng)
    _hcal(images, parts, reach_ecal, cell, energies["had"], rng)
    # every energy left is above 1e-3 of its channel's reference scale (track pT > 0.735 GeV >= 1e-3 / 0.01,
    # ECAL >= 0.1 GeV >= 1e-3 / 0.1, HCAL >= 0.5 / 25 GeV >= 1e-3 / 1): the zero suppression of the real data
    return images


def _pixel_layers(images: np.ndarray, axis_eta: np.ndarray, axis_phi: np.ndarray, parts: dict,
                  pt: np.ndarray, charged: np.ndarray, rng: np.random.Generator) -> None:
    """Tracker: pixel hits (channels pix1-3) at the layer radii, bent, for tracks produced inside them."""
    n = images.shape[0]
    c_ev, c_eta, c_phi = parts["ev"][charged], parts["eta"][charged], parts["phi"][charged]
    c_pt, c_q, c_r0 = pt[charged], parts["charge"][charged], parts["r0"][charged]
    for layer, radius in enumerate(R_PIXEL):
        reach = (K_BEND * radius / c_pt < 1.0) & (c_r0 < radius)
        bend = c_q * np.arcsin(np.minimum(K_BEND * radius / c_pt, 1.0))
        row, col, inside = _pixel(c_ev, c_eta, c_phi + bend, axis_eta, axis_phi)
        hit = inside & reach & (rng.random(c_pt.shape) < 0.97)
        images[:, CH["pix1"] + layer] = _fill(n, c_ev, row, col, np.ones_like(c_pt), hit)


def _tracks(images: np.ndarray, parts: dict, pt: np.ndarray, charged: np.ndarray, cell: tuple,
            rng: np.random.Generator) -> None:
    """Tracks (channels track_pt, dz, d0) at their pixel `cell` on the ECAL surface: the summed pT, and the
    pT-weighted mean of the impact parameters (displacement plus the prompt resolution) where tracks share."""
    n, ev, (row, col, inside) = images.shape[0], parts["ev"], cell
    n_p = parts["e"].shape[0]
    prompt = 0.002 + 0.008 / np.maximum(pt, 1.0)                        # cm, impact parameter resolution
    dz = parts["dz"] + prompt * rng.standard_normal(n_p)
    d0 = parts["d0"] + prompt * rng.standard_normal(n_p)
    track = inside & charged & (pt > 0.3) & (rng.random(n_p) < 0.95)
    sum_pt = _fill(n, ev, row, col, pt, track)
    has = sum_pt > 0
    images[:, CH["track_pt"]] = sum_pt
    for name, ip in (("dz", dz), ("d0", d0)):                           # pT-weighted mean where tracks share
        images[:, CH[name]] = np.divide(_fill(n, ev, row, col, pt * ip, track), sum_pt,
                                        out=np.zeros_like(sum_pt), where=has)


def _calo_energies(parts: dict, charged: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each particle's measured calorimeter energies (GeV), smeared: "em" (a photon's, in ECAL), "mip" (a
    charged hadron crossing ECAL), "early" (the part of a hadron shower that starts in ECAL: P_EARLY, 10-60 %
    of its energy) and "had" (the rest, in HCAL); hadron showers show HAD_RESPONSE of their energy."""
    e, species = parts["e"], parts["species"]
    n_p = e.shape[0]
    hadron = species != PHOTON
    early = hadron & (rng.random(n_p) < P_EARLY)
    mip = np.where(charged & ~early, np.minimum(e, 0.25 + rng.exponential(0.05, n_p)), 0.0)
    e_em = np.where(species == PHOTON, e, 0.0)
    e_early = np.where(early, e * rng.uniform(0.1, 0.6, n_p), 0.0)
    e_had = np.where(hadron, e - e_early - mip, 0.0)
    return {"em": _smear(e_em, 0.03, 0.005, rng), "mip": _smear(mip, 0.03, 0.005, rng),
            "early": HAD_RESPONSE * _smear(e_early, 1.0, 0.05, rng),
            "had": HAD_RESPONSE * _smear(e_had, 1.0, 0.05, rng)}


def _ecal(images: np.ndarray, parts: dict, reach_ecal: np.ndarray, cell: tuple, energies: dict,
          rng: np.random.Generator) -> None:
    """ECAL (channel ecal): photon showers, the ECAL part of early hadron showers (centred anywhere, their
    tails may come in), MIPs in their crystal; noise, then zero suppression. Secondaries (calo False) deposit
    nothing of their own."""
    n, ev, (row, col, inside) = images.shape[0], parts["ev"], cell
    calo = inside & reach_ecal & parts["calo"]                          # deposits centred in the image
    calo_wide = reach_ecal & parts["calo"]                              # showers centred anywhere
    ecal = _scatter(n, ev, row, col, energies["em"], calo_wide, _em_kernel())
    ecal += _scatter(n, ev, row, col, energies["early"], calo_wide, _had_kernel())
    ecal += _fill(n, ev, row, col, energies["mip"], calo)
    ecal += ECAL_NOISE * rng.standard_normal(ecal.shape, dtype=np.float32)   # electronic noise per crystal
    ecal[ecal < ECAL_ZS] = 0.0                                          # zero suppression
    images[:, CH["ecal"]] = ecal


def _hcal(images: np.ndarray, parts: dict, reach_ecal: np.ndarray, cell: tuple, e_had: np.ndarray,
          rng: np.random.Generator) -> None:
    """HCAL (channel hcal): towers = 5 x 5 blocks of the image grid, (n, 25, 25); HCAL_CORE of a hadron's
    energy in its tower, the rest shared by the 8 around (lateral leakage); noise and zero suppression per
    tower, then each tower spread uniformly over its 25 pixels."""
    n, (row, col, _) = images.shape[0], cell
    n_t = IMAGE_SIZE // TOWER
    towers = _scatter(n, parts["ev"], np.floor_divide(row, TOWER), np.floor_divide(col, TOWER), e_had,
                      reach_ecal & parts["calo"], _tower_kernel(), n_t)
    towers += HCAL_NOISE * rng.standard_normal(towers.shape)
    towers[towers < HCAL_ZS] = 0.0
    images[:, CH["hcal"]] = np.repeat(np.repeat(towers, TOWER, axis=1), TOWER, axis=2) / TOWER ** 2


# ----------------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------------

def with_environment(hard: dict, axis_eta: np.ndarray, axis_phi: np.ndarray, ue_mean: float,
                     rng: np.random.Generator) -> dict:
    """The hard process's particles plus the underlying event (Poisson `ue_mean`), pileup (PILEUP_MEAN) and
    the secondaries of all of them (interactions in the tracker material)."""
    prompt = _concat([hard, underlying_event(axis_eta, axis_phi, ue_mean, rng),
                      pileup(axis_eta, axis_phi, PILEUP_MEAN, rng)])
    return _concat([prompt, secondaries(prompt, rng)])


def simulate_top(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n boosted t -> b q q' events (see the module docstring)."""
    m = rng.uniform(85.0, 500.0, n)
    pt = rng.uniform(400.0, 1000.0, n)
    eta = rng.uniform(-TOP_ETA_MAX, TOP_ETA_MAX, n)
    phi = rng.uniform(0.0, 2 * np.pi, n)
    top = four_vector(pt, eta, phi, m)                                  # (n, 4)
    m_b = 4.8
    m_w = truncated_breit_wigner(80.4, 2.1, 1.0, m - m_b, rng)          # (n,)
    b, w = two_body(top, m, m_b, m_w, rng)
    q1, q2 = two_body(w, m_w, 0.0, 0.0, rng)
    partons = np.stack([b, q1, q2], axis=1)                             # (n, 3, 4)
    _, axis_phi = eta_phi(top)                                          # = phi folded into (-pi, pi]
    parts = with_environment(shower(partons, np.array([True, False, False]), rng), eta, axis_phi, 8.0, rng)
    ieta, iphi = tower_labels(eta, phi)
    return {"X_jet": render(n, eta, axis_phi, parts, rng), "m": m, "pt": pt, "ieta": ieta, "iphi": iphi}


def simulate_a2gg(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n A -> gamma gamma events (see the module docstring)."""
    m = rng.uniform(0.0, 2.0, n)
    pt = rng.uniform(10.0, 150.0, n)
    eta = rng.uniform(-2.0, 2.0, n)
    phi = rng.uniform(0.0, 2 * np.pi, n)
    parent = four_vector(pt, eta, phi, m)
    g1, g2 = two_body(parent, m, 0.0, 0.0, rng)
    photons = np.stack([g1, g2], axis=1)                                # (n, 2, 4)
    p_eta, p_phi = eta_phi(photons)
    ev = np.repeat(np.arange(n), 2)
    gammas = _particles(ev, p_eta.ravel(), p_phi.ravel(), photons[..., 0].ravel(),
                        np.full(2 * n, PHOTON), np.zeros(2 * n))
    parts = with_environment(gammas, eta, phi, 3.0, rng)
    ieta, iphi = tower_labels(eta, phi)
    return {"X_jet": render(n, eta, phi, parts, rng), "m": m, "pt": pt, "ieta": ieta, "iphi": iphi,
            "eta": eta}


def simulate(process: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Pure: n events -> {"X_jet": (n, 8, 125, 125) float64, "m", "pt", "ieta", "iphi": (n,) float64, and
    "eta" for a2gg}, in the column order of the files. Vectorised over events."""
    if process == "top":
        return simulate_top(n, rng)
    if process == "a2gg":
        return simulate_a2gg(n, rng)
    raise SynthError(f"unknown process {process!r}: use one of {', '.join(PROCESSES)}")
