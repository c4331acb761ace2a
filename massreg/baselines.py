"""A physics baseline for the mass: k nearest neighbours on (invariant mass of the calorimeter pixels, pT).

Usage:
    e = calo_energy(images, channels)                 # (B, C, 125, 125) -> (B, 125, 125) GeV, ECAL + HCAL
    m_pix = pixel_mass(e, eta_from_ieta(ieta))        # (B,) GeV
    knn = fit_knn(np.stack([m_pix_train, pt_train], 1), m_train, k=30)
    m_hat = knn_predict(knn, np.stack([m_pix, pt], 1))   # (N,) GeV

Pixel mass. Each calorimeter pixel (the ECAL and HCAL channels, whichever of them the file holds) is a
massless particle of energy E = pixel value (GeV; pipeline/synth.py and the real data store energies, not
transverse energies) at

    eta = eta_jet + (row - 62) * 0.0174,    phi = phi_jet + (col - 62) * 0.0174

(a pixel is one ECAL crystal, 0.0174 x 0.0174; the image is centred on the jet axis, pixel 62; rows are eta,
columns phi). eta_jet is the centre of the jet axis' HCAL tower, (ieta - 28 + 0.5) * 0.087 (ieta = floor(eta
/ 0.087) + 28); without an ieta label the caller passes 0, which is exact only for central jets. The mass is
invariant under rotations about the beam, so phi_jet = 0. Then

    px = E cos(phi) / cosh(eta),  py = E sin(phi) / cosh(eta),  pz = E tanh(eta)
    m = sqrt(max((sum E)^2 - |sum p|^2, 0))

summed over all pixels of the image. HCAL energy is spread uniformly over the 25 pixels of its 5 x 5 tower
(pipeline/synth.py; the real data as well), so summing its pixels puts the tower's energy at its centre of
gravity, and ECAL and HCAL can be added pixel by pixel first (the four-vector is linear in E).

The direction of a pixel depends on its row only through eta and on its column only through phi, so the sums
factorise: sum over columns with (125,) cos/sin tables, then over rows with (B, 125) factors 1/cosh(eta),
tanh(eta) of each image's eta_jet. One matrix product per batch, no Python loop over rows or pixels.

kNN. Features are standardised with the mean and std of the fit rows; the prediction is the mean mass of the k
nearest fit rows in Euclidean distance, found by brute force (torch.cdist + topk) in chunks of queries, so
memory stays bounded; float64 on the CPU, deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

PIXEL = 0.0174         # one ECAL crystal in eta and in phi
TOWER_ETA = 0.087      # one HCAL tower in eta: ieta = floor(eta / 0.087) + 28
IETA_ZERO = 28         # the tower that starts at eta = 0
CENTRE = 62            # the pixel that holds the jet axis (images are 125 x 125)
CALO_CHANNELS = ("ecal", "hcal")
CHUNK_ELEMENTS = 1 << 22  # query rows x fit rows per cdist chunk: 4 M float64 = 32 MB


def eta_from_ieta(ieta) -> np.ndarray:
    """The eta of the centre of HCAL tower `ieta` (float64 array)."""
    return (np.asarray(ieta, dtype=np.float64) - IETA_ZERO + 0.5) * TOWER_ETA


def calo_channels(channels: Sequence[str]) -> list[int]:
    """Positions of the calorimeter channels (ECAL, HCAL) among a file's channel names; [] if none."""
    return [i for i, name in enumerate(channels) if name in CALO_CHANNELS]


def calo_energy(images, channels: Sequence[str]) -> np.ndarray:
    """images (B, C, H, W) of a file with these channel names -> (B, H, W) float64: ECAL + HCAL per pixel.

    ValueError when the channels hold neither ECAL nor HCAL.
    """
    images = np.asarray(images)
    idx = calo_channels(channels)
    if not idx:
        raise ValueError(f"channels {list(channels)} hold no calorimeter channel "
                         f"({', '.join(CALO_CHANNELS)})")
    if images.ndim != 4 or images.shape[1] != len(channels):
        raise ValueError(f"images {images.shape} must be (B, {len(channels)}, H, W) for channels "
                         f"{list(channels)}")
    out = images[:, idx[0]].astype(np.float64)  # (B, H, W), a copy
    for i in idx[1:]:
        out += images[:, i]
    return out


def pixel_mass(energy, eta_jet) -> np.ndarray:
    """Invariant mass (GeV) of the pixels of each image, each a massless particle (module docstring).

    energy: (B, H, W) or (H, W) pixel energies in GeV (numpy or CPU torch, any float dtype); eta_jet: (B,) or
    a scalar, the eta of the jet axis (the image centre). Returns (B,) float64, or a float for one image.
    """
    e = np.asarray(energy, dtype=np.float64)
    single = e.ndim == 2
    e = e[None] if single else e
    if e.ndim != 3 or e.shape[1] != e.shape[2]:
        raise ValueError(f"energy must be (B, H, W) or (H, W) with H == W, got {np.shape(energy)}")
    b, size = e.shape[0], e.shape[1]
    centre = CENTRE if size == 125 else (size - 1) // 2
    offsets = (np.arange(size) - centre) * PIXEL               # (S,) eta offset of each row = phi of each col
    eta_jet = np.broadcast_to(np.asarray(eta_jet, dtype=np.float64), (b,))
    # column sums weighted by the (S,) phi tables: (B, S rows, 3) = sum_col E * [cos phi, sin phi, 1]
    phi_table = np.stack([np.cos(offsets), np.sin(offsets), np.ones(size)], axis=1)  # (S, 3)
    rows = e @ phi_table                                         # (B, S, 3)
    eta = eta_jet[:, None] + offsets[None, :]                    # (B, S) eta of each row
    sech, tanh = 1.0 / np.cosh(eta), np.tanh(eta)
    px = np.einsum("br,br->b", rows[..., 0], sech)
    py = np.einsum("br,br->b", rows[..., 1], sech)
    pz = np.einsum("br,br->b", rows[..., 2], tanh)
    energy_sum = rows[..., 2].sum(axis=1)
    m = np.sqrt(np.maximum(energy_sum ** 2 - px ** 2 - py ** 2 - pz ** 2, 0.0))  # (B,)
    return float(m[0]) if single else m


@dataclass(frozen=True)
class KNN:
    """A fitted k-nearest-neighbour regressor (fit_knn): standardised fit rows and their targets."""
    k: int                # neighbours averaged (<= number of fit rows)
    mean: np.ndarray      # (F,) feature means of the fit rows
    std: np.ndarray       # (F,) feature stds of the fit rows (1 where a feature is constant)
    x: torch.Tensor       # (N, F) float64 standardised fit features
    y: torch.Tensor       # (N,) float64 fit targets


def fit_knn(features, targets, *, k: int = 30) -> KNN:
    """Standardise features (N, F) with their own mean/std, keep them with targets (N,); k is capped at N."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"features {x.shape} must be (N, F) and targets {y.shape} (N,), with N >= 1")
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("features and targets of the kNN fit must be finite")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return KNN(k=min(int(k), x.shape[0]), mean=mean, std=std, x=torch.from_numpy((x - mean) / std),
               y=torch.from_numpy(y.copy()))


def knn_predict(knn: KNN, features, *, chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """Mean target of the k nearest fit rows (Euclidean, standardised features) for each row of (M, F)."""
    q = np.asarray(features, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != knn.x.shape[1]:
        raise ValueError(f"features {q.shape} must be (M, {knn.x.shape[1]})")
    q = torch.from_numpy((q - knn.mean) / knn.std)
    chunk = max(1, chunk_elements // knn.x.shape[0])
    out = []
    for lo in range(0, q.shape[0], chunk):  # over chunks of queries, bounded memory
        # exact differences (not the |a|^2 + |b|^2 - 2ab expansion): no cancellation, ties stay ties
        d = torch.cdist(q[lo:lo + chunk], knn.x, compute_mode="donot_use_mm_for_euclid_dist")  # (Q, N)
        idx = torch.topk(d, knn.k, dim=1, largest=False, sorted=True).indices                # (Q, k)
        out.append(knn.y[idx].mean(dim=1))
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float64)
