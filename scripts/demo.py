"""`make demo`: fuse the default pair through the QGIS Processing algorithm, headless.

Default pair: the real Berlin EnMAP (30 m, 177 bands) + HyMap (3.6 m, 4 bands) images from
../shared/data/berlin when present, otherwise a generated scene (csakd_qgis.synthetic).
Writes demo_output/fused.tif and demo_output/fused_quicklook.png and prints how consistent
the result is with both inputs, beside bicubic upsampling.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the engine, for the quicklook and the consistency numbers
sys.path.append("/usr/share/qgis/python/plugins")  # QGIS's Processing framework

from scripts.qgis_session import start_qgis_with_plugin  # noqa: E402

BERLIN = ROOT.parent / "shared" / "data" / "berlin"
OUTPUT = ROOT / "demo_output"


def default_pair():
    lr = BERLIN / "EnMAP_BerlinUrbanGradient_177b_30m.bsq"
    hr = BERLIN / "HighResolution_BerlinUrbanGradient_HyMap4b_3m6.bsq"
    if lr.exists() and hr.exists():
        return lr, hr, "the real Berlin pair (EnMAP-simulated 30 m, 177 bands + HyMap 3.6 m, 4 bands)"
    from csakd_qgis.synthetic import write_scene

    lr, hr = write_scene(OUTPUT / "inputs")
    return lr, hr, (
        f"a generated scene (96 bands at 40 m + 4 bands at 10 m), not real data: {BERLIN} was not found "
        "(see the README's 'Data and attribution' for where the real pair comes from)"
    )


def main() -> int:
    lr, hr, label = default_pair()
    print(f"inputs: {label}\n  LR-HSI {lr}\n  HR-MSI {hr}")
    app = start_qgis_with_plugin()
    import processing
    from qgis.core import QgsProcessingFeedback

    class PrintFeedback(QgsProcessingFeedback):
        def pushInfo(self, info):  # noqa: N802
            print("  " + info, flush=True)

    OUTPUT.mkdir(exist_ok=True)
    fused = OUTPUT / "fused.tif"
    started = time.time()
    processing.run(
        "csakd:hyperspectralfusion",
        {"LRHSI": str(lr), "HRMSI": str(hr), "OUTPUT": str(fused)},
        feedback=PrintFeedback(),
    )
    print(f"fused in {time.time() - started:.1f} s → {fused}")

    from csakd_qgis.consistency import consistency_report
    from csakd_qgis.quicklook import write_quicklook

    png = write_quicklook(fused, OUTPUT / "fused_quicklook.png")
    print(f"quicklook → {png}")
    report = consistency_report(lr, hr, fused)
    print(report.table(label.split(" (")[0]))
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
