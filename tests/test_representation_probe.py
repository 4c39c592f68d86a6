"""The wavelength-grid representation and its probe (representation_probe.py)."""

import math

import numpy as np
import pytest
import torch

from csakd_qgis import datasets, representation_probe as rp
from csakd_qgis.srf import linear_resampling_matrix

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_linear_resampling_reproduces_a_linear_spectrum_from_unsorted_bands():
    # Two detectors listed one after the other, overlapping (as EnMAP's VNIR and SWIR).
    source = np.array([420.0, 600.0, 800.0, 980.0, 900.0, 1200.0, 1700.0, 2400.0])
    target = np.array([300.0, 410.0, 500.0, 950.0, 1000.0, 2000.0, 2420.0, 2500.0])
    matrix = linear_resampling_matrix(source, target, reach_nm=25.0)
    spectrum = 0.3 + 1e-4 * source
    inside = (target >= source.min()) & (target <= source.max())
    np.testing.assert_allclose((matrix @ spectrum)[inside], (0.3 + 1e-4 * target)[inside], rtol=1e-12)
    # Within reach beyond an end: the end sample; beyond reach: nothing known, a zero row.
    assert matrix[1, 0] == 1.0 and matrix[6, 7] == 1.0
    assert not matrix[0].any() and not matrix[7].any()
    np.testing.assert_allclose(matrix[inside].sum(1), 1.0)
    with pytest.raises(ValueError, match="finite"):
        linear_resampling_matrix(np.array([400.0, np.nan]), target)


def test_grid_maps_cover_only_the_sensors_range_and_return_to_its_bands():
    wavelengths = np.linspace(420.0, 1000.0, 60)  # a VNIR-only sensor
    to, back, mask = rp.representation_maps("grid", wavelengths, np.zeros((60, 4)))
    from csakd_qgis.model import WAVELENGTH_GRID_NM as grid
    assert to.shape == (grid.size, 60) and back.shape == (60, grid.size)
    covered = (grid >= 420.0 - 25.0) & (grid <= 1000.0 + 25.0)
    np.testing.assert_array_equal(mask.numpy(), covered.astype(np.float32))
    assert not back[:, ~covered].any()
    # A linear spectrum survives the trip to the grid and back, up to the held ends.
    spectrum = torch.from_numpy((0.2 + 3e-4 * wavelengths).astype(np.float32))
    round_trip = back @ (to @ spectrum)
    inner = (wavelengths >= 450.0) & (wavelengths <= 1000.0)
    np.testing.assert_allclose(round_trip.numpy()[inner], spectrum.numpy()[inner], rtol=1e-5)
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(60, 4)))[0]
    to, back, mask = rp.representation_maps("subspace", None, basis)
    np.testing.assert_allclose(to.numpy(), basis.T, rtol=1e-6)
    assert mask.tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="band centres"):
        rp.representation_maps("grid", None, basis)


@pytest.mark.parametrize("representation,consistent", [("grid", False), ("subspace", False), ("grid", True)])
def test_the_representation_probe_measures_each_held_out_cube(shared_data_dir, representation, consistent):
    train = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if c.name in ("EnMAP Potsdam block C", "HyMap02 Berlin")]
    lines = []
    gains = rp.representation_probe(train, held_out, datasets.validation_sensors()["Sentinel-2 10 m"], representation,
                                    steps=2, batch_size=2, crop=32, held_out_batches=1, evaluate_every=1,
                                    consistent=consistent, log=lines.append)
    assert list(gains) == ["EnMAP Potsdam block C", "HyMap02 Berlin"]
    for series in gains.values():
        assert [step for step, _ in series] == [1, 2]
        assert all(math.isfinite(gain) for _, gain in series)
    # One Adam step moves the zero-initialised last convolution: the held-out loss changes.
    assert any(abs(gain) > 1e-4 for series in gains.values() for _, gain in series)
    assert len(lines) == 2 and f"{representation}: EnMAP Potsdam block C" in lines[0] and lines[0].endswith(" dB")


def test_the_grid_refuses_cubes_without_band_centres(shared_data_dir):
    hydice = next(c for c in datasets.corpus_cubes(shared_data_dir) if c.name == "hydice_urban_80x100")
    sensor = datasets.validation_sensors()["RGB"]
    with pytest.raises(ValueError, match="needs band centres, which hydice_urban_80x100 lack"):
        rp.representation_probe([hydice], [hydice], sensor, "grid", steps=1)
    with pytest.raises(ValueError, match="representation must be one of"):
        rp.representation_probe([hydice], [hydice], sensor, "pixels", steps=1)


@pytest.mark.parametrize("representation,unshuffle,centred", [("grid", 1, True), ("subspace", None, False)])
def test_the_probe_trains_the_students_own_network_in_either_layout(shared_data_dir, representation, unshuffle, centred):
    """--network student: the bundled student's CSAKD network, in the paper's layout
    (unshuffle 1) or the bundled one (4), is trained in the probe's plumbing and measured on each
    held-out cube; its correction starts at zero (the held-out loss moves only after a step)."""
    net = rp.student_network(representation, unshuffle, 16)
    assert net.config.unshuffle == (unshuffle or 4) and net.config.width == 16 and net.config.growth == 8
    assert not net.head_refine.weight.any() and not net.head_refine.bias.any()
    train = [c for c in datasets.training_cubes(shared_data_dir) if "Potsdam" in c.name]
    held_out = [c for c in datasets.validation_cubes(shared_data_dir) if c.name == "AVIRIS Jasper Ridge"]
    gains = rp.representation_probe(train, held_out, datasets.validation_sensors()["Sentinel-2 10 m"], representation,
                                    steps=2, batch_size=2, crop=32, width=16, held_out_batches=1, evaluate_every=1,
                                    consistent=True, network="student", unshuffle=unshuffle, centred=centred,
                                    log=lambda line: None)
    series = gains["AVIRIS Jasper Ridge"]
    assert [step for step, _ in series] == [1, 2] and all(math.isfinite(gain) for _, gain in series)
    assert any(abs(gain) > 1e-5 for _, gain in series)
    with pytest.raises(ValueError, match="network must be one of"):
        rp.representation_probe(train, held_out, datasets.validation_sensors()["RGB"], representation, steps=1,
                                network="unet")
