"""massreg.baselines: the pixel mass on images whose mass is known by hand, and the kNN on hand-made sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from massreg.baselines import (calo_channels, calo_energy, eta_from_ieta, fit_knn, knn_predict,
                               pixel_mass)

S, C, PIX = 125, 62, 0.0174


def unit_vector(eta: float, phi: float) -> np.ndarray:
    """Direction from the polar angle theta = 2 atan(exp(-eta)), not from the code's cosh/tanh form."""
    theta = 2 * np.arctan(np.exp(-eta))
    return np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])


def reference_mass(energy: np.ndarray, eta_jet: float) -> float:
    """m of one (S, S) image, summing explicit four-vectors pixel by pixel (the slow, obvious way)."""
    total = np.zeros(4)
    for r, c in zip(*np.nonzero(energy)):
        e = energy[r, c]
        total += np.r_[e, e * unit_vector(eta_jet + (r - C) * PIX, (c - C) * PIX)]
    return float(np.sqrt(max(total[0] ** 2 - total[1:] @ total[1:], 0.0)))


@pytest.mark.parametrize("eta_jet", [0.0, 0.9, -1.3])
def test_two_pixels_give_the_two_body_mass(eta_jet):
    e1, e2 = 180.0, 45.0
    (r1, c1), (r2, c2) = (C - 4, C + 3), (C + 7, C - 9)
    img = np.zeros((S, S))
    img[r1, c1], img[r2, c2] = e1, e2
    n1 = unit_vector(eta_jet + (r1 - C) * PIX, (c1 - C) * PIX)
    n2 = unit_vector(eta_jet + (r2 - C) * PIX, (c2 - C) * PIX)
    want = np.sqrt(2 * e1 * e2 * (1 - n1 @ n2))  # massless pair: m^2 = 2 E1 E2 (1 - cos theta12)
    assert want > 1.0
    assert pixel_mass(img, eta_jet) == pytest.approx(want, rel=1e-9)
    # float16 torch input (what a batch holds) gives the same (these energies are exact in float16)
    got = pixel_mass(torch.from_numpy(img[None].astype(np.float16)), np.array([eta_jet]))
    assert got.shape == (1,) and got[0] == pytest.approx(want, rel=1e-9)
    # a jet further forward: the same pixel pattern spans a smaller angle, so the mass drops
    assert pixel_mass(img, eta_jet + 0.5 * np.sign(eta_jet or 1)) < want


def test_one_pixel_and_empty_images_are_massless():
    one = np.zeros((S, S))
    one[10, 100] = 250.0
    assert pixel_mass(one, 0.7) == pytest.approx(0.0, abs=1e-4 * 250)
    assert pixel_mass(np.zeros((S, S)), 0.7) == 0.0
    assert np.array_equal(pixel_mass(np.zeros((3, S, S)), np.zeros(3)), np.zeros(3))


def test_batch_equals_each_image_and_the_reference():
    rng = np.random.default_rng(3)
    energy = rng.exponential(2.0, (5, S, S)) * (rng.random((5, S, S)) < 0.01)  # sparse, positive
    eta_jet = np.array([0.0, 0.3, -0.8, 1.2, -1.35])
    batch = pixel_mass(energy, eta_jet)
    assert batch.shape == (5,) and batch.dtype == np.float64 and np.all(batch > 0)
    for i in range(5):
        assert batch[i] == pixel_mass(energy[i], eta_jet[i])
        assert batch[i] == pytest.approx(reference_mass(energy[i], eta_jet[i]), rel=1e-9)
    # one scalar eta for the whole batch broadcasts
    assert np.allclose(pixel_mass(energy, 0.3), [pixel_mass(e, 0.3) for e in energy], rtol=1e-12)


def test_calo_channels_by_name():
    assert calo_channels(["track_pt", "dz", "d0", "ecal", "hcal", "pix1"]) == [3, 4]
    assert calo_channels(["track_pt", "dz", "d0", "ecal"]) == [3]
    assert calo_channels(["track_pt", "dz", "d0"]) == []
    images = np.zeros((2, 3, S, S), dtype=np.float16)
    images[:, 0] = 7.0          # track pT: not a calorimeter
    images[0, 1, 5, 5] = 2.0    # ecal
    images[0, 2, 5, 5] = 0.5    # hcal, same pixel: summed
    images[1, 2, 9, 9] = 1.5
    e = calo_energy(images, ["track_pt", "ecal", "hcal"])
    assert e.shape == (2, S, S) and e.dtype == np.float64
    assert e[0, 5, 5] == 2.5 and e[1, 9, 9] == 1.5 and e.sum() == 4.0
    assert calo_energy(images, ["track_pt", "hcal", "pix1"]).sum() == 2.0  # only the plane named hcal
    with pytest.raises(ValueError, match="no calorimeter channel"):
        calo_energy(images, ["track_pt", "dz", "d0"])


def test_eta_from_ieta_is_the_tower_centre_of_the_generator():
    from pipeline.synth import tower_labels

    eta = np.random.default_rng(0).uniform(-1.39, 1.39, 1000)
    ieta, _ = tower_labels(eta, np.zeros_like(eta))
    assert np.all(np.abs(eta_from_ieta(ieta) - eta) <= 0.087 / 2 + 1e-12)
    assert eta_from_ieta(28) == pytest.approx(0.0435) and eta_from_ieta(27) == pytest.approx(-0.0435)


def test_pixel_mass_of_generated_top_jets_does_not_depend_on_eta():
    """On generator events (ECAL + HCAL, HCAL spread over 5 x 5 pixels), contained jets (2 m / pT < 0.6)
    keep the same pixel mass / m in the centre and forward: the eta_jet from ieta is right. With eta_jet = 0
    forward jets would look ~1.5x heavier (angles shrink by cosh(eta))."""
    from pipeline.layout import CHANNEL_NAMES
    from pipeline.synth import simulate

    m, pt, eta, mp = [], [], [], []
    for chunk in range(3):
        ev = simulate("top", 128, np.random.default_rng([7, chunk]))
        eta_jet = eta_from_ieta(ev["ieta"])
        mp.append(pixel_mass(calo_energy(ev["X_jet"], CHANNEL_NAMES), eta_jet))
        m.append(ev["m"]), pt.append(ev["pt"]), eta.append(eta_jet)
    m, pt, eta, mp = map(np.concatenate, (m, pt, eta, mp))
    contained = 2 * m / pt < 0.6
    central, forward = contained & (np.abs(eta) < 0.5), contained & (np.abs(eta) > 0.9)
    assert central.sum() > 20 and forward.sum() > 20
    ratio_c, ratio_f = np.median(mp[central] / m[central]), np.median(mp[forward] / m[forward])
    assert 0.6 < ratio_c < 1.2, ratio_c
    assert abs(ratio_f / ratio_c - 1) < 0.15, (ratio_c, ratio_f)
    assert np.corrcoef(mp[contained], m[contained])[0, 1] > 0.7


# ------------------------------------------------------------------------------------------------ kNN


def test_knn_1d_hand_computed():
    x = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    y = np.array([100.0, 200.0, 300.0, 400.0, 900.0])
    knn = fit_knn(x, y, k=2)
    # standardising one feature does not change who is nearest: 0.4 -> {0, 1}, 2.6 -> {2, 3}, 9 -> {10, 3}
    got = knn_predict(knn, np.array([[0.4], [2.6], [9.0]]))
    assert np.allclose(got, [150.0, 350.0, 650.0])
    assert np.allclose(knn_predict(fit_knn(x, y, k=1), [[1.9], [-5.0]]), [300.0, 100.0])
    # k above the number of rows is capped: every query answers the mean
    big = fit_knn(x, y, k=30)
    assert big.k == 5 and np.allclose(knn_predict(big, [[0.0], [7.0]]), y.mean())


def test_knn_2d_standardises_each_feature():
    # feature 1 in GeV-like units, feature 2 a thousand times larger: standardised, both count the same
    pts = np.array([[0, 0], [1, 0], [0, 1], [5, 5], [6, 5], [5, 6]], dtype=float)
    y = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    q = np.array([[0.2, 0.1], [5.5, 5.4]])
    small = knn_predict(fit_knn(pts, y, k=3), q)
    assert np.allclose(small, [2.0, 20.0])  # the three of each cluster
    scale = np.array([1.0, 1000.0])
    assert np.allclose(knn_predict(fit_knn(pts * scale, y, k=3), q * scale), small)
    # k = 2, by hand on standardised values: means and stds of the six rows
    mean, std = pts.mean(0), pts.std(0)
    d = np.linalg.norm(((q[:, None] - pts[None]) / std), axis=-1)  # (2, 6); the mean cancels
    near = np.argsort(d, axis=1)[:, :2]
    want = y[near].mean(1)
    assert np.allclose(knn_predict(fit_knn(pts, y, k=2), q), want)
    assert np.allclose(want, [1.5, 15.0])  # (0,0)+(1,0) and (5,5)+(6,5)
    assert np.allclose(fit_knn(pts, y).mean, mean)


def test_knn_chunks_agree_and_inputs_are_checked():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(500, 2)), rng.uniform(85, 500, 500)
    q = rng.normal(size=(123, 2))
    knn = fit_knn(x, y, k=7)
    whole = knn_predict(knn, q)
    assert np.array_equal(knn_predict(knn, q, chunk_elements=500 * 5), whole)   # 5 queries per chunk
    assert np.array_equal(knn_predict(knn, q, chunk_elements=1), whole)         # 1 query per chunk
    # against a brute-force numpy reference
    xs, qs = (x - x.mean(0)) / x.std(0), (q - x.mean(0)) / x.std(0)
    near = np.argsort(((qs[:, None] - xs[None]) ** 2).sum(-1), axis=1)[:, :7]
    assert np.allclose(whole, y[near].mean(1), rtol=1e-12)
    assert knn_predict(knn, np.zeros((0, 2))).shape == (0,)
    with pytest.raises(ValueError, match="must be"):
        knn_predict(knn, q[:, :1])
    with pytest.raises(ValueError, match="k must be"):
        fit_knn(x, y, k=0)
    with pytest.raises(ValueError, match="finite"):
        fit_knn(np.array([[np.nan]]), np.array([1.0]))
