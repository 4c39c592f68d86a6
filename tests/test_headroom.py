"""The headroom probe (csakd_qgis.headroom) on a real validation case: its reach is exactly
what the student's correction can add, and it reports the base's room and the two fits."""

import numpy as np
import pytest
import torch

from tests.helpers import randomise_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sentinel2_case(shared_data_dir):
    from csakd_qgis.datasets import load_potsdam_block, make_wald_case, validation_sensors

    case = make_wald_case(load_potsdam_block("C", shared_data_dir), validation_sensors()["Sentinel-2 10 m"], 4)
    case.sensor = "Sentinel-2 10 m"
    return case


def test_the_reach_is_what_a_students_correction_can_add(sentinel2_case):
    """What a student with a random output convolution (as a trained one has) adds to its base is
    left unchanged by the probe's projection (so the reach is taken over the student's own
    corrections), and the reach's own correction changes neither what the LR-HSI nor what the
    MSI sees."""
    from csakd_qgis.datasets import case_statistics, validation_sensors
    from csakd_qgis.headroom import case_pair
    from csakd_qgis.model import SubspaceFusionModel
    from csakd_qgis.psf import degrade_torch
    from csakd_qgis.srf import spectral_response_matrix
    from csakd_qgis.train import student_config

    case, k = sentinel2_case, 16
    statistics = case_statistics(case, k)
    room = case_pair(case, statistics, k)
    stats = statistics.to_tensors()
    lr, hr = torch.from_numpy(case.lr_hsi)[None], torch.from_numpy(case.hr_msi)[None]
    with torch.no_grad():
        trained = randomise_head(SubspaceFusionModel(student_config(subspace_dim=k)), seed=4).eval()
        added = trained(lr, hr, stats).image[0].double() - room.image
    coefficients = (torch.einsum("bk,bhw->khw", room.basis, added) / room.rho)[None]
    assert coefficients.norm() > 1e-3
    # Within 1.2 % (measured): the consistent interpolator is not an exact inverse of the
    # degradation, so (I − P·D) taken twice differs a little from once (by 0.25 %).
    assert (room.within_reach(coefficients) - coefficients).norm() < 0.03 * coefficients.norm()
    inner = (slice(None), slice(12, -12), slice(12, -12))

    reach = room.corrected(room.error(case.reference)) - room.image
    seen_by_lr = degrade_torch(reach[None], case.degradation)[0]
    assert seen_by_lr[inner].norm() < 0.05 * reach[inner].norm()
    response, _ = spectral_response_matrix(validation_sensors()["Sentinel-2 10 m"], case.wavelengths_nm)
    seen_by_msi = torch.einsum("mb,bhw->mhw", torch.from_numpy(response).double(), reach)
    assert seen_by_msi.norm() < 0.05 * reach.norm() * np.linalg.norm(response, 2)


def test_probe_case_reports_the_room_and_both_fits(sentinel2_case):
    from csakd_qgis.headroom import probe_case

    row = probe_case(sentinel2_case, steps=150, seeds=(0,))
    assert 30 < row["base"] < 45
    # Measured +10.7 dB: the student is far from what its correction could reach.
    assert row["reach"] > 5 and row["reach_sam"] < -1
    assert np.isfinite(row["in_scene"]) and np.isfinite(row["reduced_pair"]) and np.isfinite(row["reduced_pair_sam"])
    assert abs(row["in_scene"]) < row["reach"]


def test_impossible_options_are_usage_errors(capsys):
    from csakd_qgis.headroom import main

    for args, message in ((["--steps", "0"], "--steps must be at least 1, got 0"),
                          (["--seeds", "0"], "--seeds must be at least 1, got 0"),
                          (["--scales", "1"], "--scales must be 2 or more, got [1]")):
        with pytest.raises(SystemExit):
            main(args)
        assert message in capsys.readouterr().err
