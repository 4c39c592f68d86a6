from pathlib import Path

import numpy as np
import pytest

from csakd_qgis.cubes import load_jasper_ridge, load_moffett, load_samson

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _neighbour_corr(img):
    # Correlation between horizontally and vertically adjacent pixels; a wrong
    # reshape order scrambles neighbours and drives it towards zero.
    a = np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1]
    b = np.corrcoef(img[:-1, :].ravel(), img[1:, :].ravel())[0, 1]
    return min(a, b)


@pytest.mark.usefixtures("shared_data_dir")
@pytest.mark.parametrize(
    "loader,shape,wl_range",
    [
        (load_jasper_ridge, (198, 100, 100), (400, 2460)),
        (load_samson, (156, 95, 95), (401, 889)),
        (load_moffett, (189, 50, 50), (380, 2280)),
    ],
)
def test_cube_loads_coherently(loader, shape, wl_range):
    cube, wl = loader(DATA_DIR)
    assert cube.shape == shape and cube.dtype == np.float32
    assert np.isfinite(cube).all()
    assert wl.shape == (shape[0],)
    assert np.all(np.diff(wl) > 0)
    assert wl_range[0] <= wl[0] and wl[-1] <= wl_range[1]
    assert _neighbour_corr(cube[shape[0] // 2]) > 0.5


@pytest.mark.usefixtures("shared_data_dir")
def test_samson_wavelengths_even():
    _, wl = load_samson(DATA_DIR)
    assert wl[0] == pytest.approx(401) and wl[-1] == pytest.approx(889)
    np.testing.assert_allclose(np.diff(wl), (889 - 401) / 155)


@pytest.mark.usefixtures("shared_data_dir")
def test_jasper_water_map_is_one_column_band():
    # The abundance map shipped with the file puts the reservoir in a
    # vertical strip (cols ~30-60) with the column-major reshape; the row
    # order would put it in rows instead.  Water is dark in the NIR.
    cube, wl = load_jasper_ridge(DATA_DIR)
    nir = cube[np.argmin(np.abs(wl - 850))]
    dark = nir < np.percentile(nir, 25)
    col_profile = dark.mean(axis=0)
    row_profile = dark.mean(axis=1)
    assert col_profile.max() > 0.8
    assert row_profile.max() < col_profile.max()
