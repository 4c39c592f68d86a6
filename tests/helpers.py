"""Helpers shared by the tests."""

import hashlib
import os
import subprocess


def randomise_head(model, seed=0):
    """A new SubspaceFusionModel starts as the classical base (zero output convolution);
    tests of the network path give it a random one, as a trained model has."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    head = model.network.head_refine
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.05)
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 0.05)
    return model


def recording_feedback():
    """A QgsProcessingFeedback that keeps every message (``messages``) and progress value."""
    from qgis.core import QgsProcessingFeedback

    class RecordingFeedback(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.messages = []
            self.progress_values = []
            self.progressChanged.connect(self.progress_values.append)

        def pushInfo(self, info):  # noqa: N802 (QGIS name)
            self.messages.append(info)
            super().pushInfo(info)

        def reportError(self, error, fatalError=False):  # noqa: N802,N803 (QGIS names)
            self.messages.append(error)
            super().reportError(error, fatalError)

    return RecordingFeedback()


def clean_env(**overrides):
    env = dict(os.environ)
    # pytest-qgis points QGIS_CUSTOM_CONFIG_PATH at its own profile; a nested make
    # would otherwise inherit the outer make's jobserver settings.
    for key in ("QGIS_CUSTOM_CONFIG_PATH", "QGIS_OPTIONS_PATH", "QGIS_PLUGINPATH",
                "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTHONPATH"):
        env.pop(key, None)
    env["QT_QPA_PLATFORM"] = "offscreen"
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_command(cmd, **kwargs):
    result = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
        **kwargs,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def expect_refusal(run_fusion, *fragments, **parameters):
    """Run the fusion algorithm, expect a QgsProcessingException whose message names every
    fragment (case-insensitive); returns the message."""
    import pytest
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException) as caught:
        run_fusion(**parameters)
    message = str(caught.value)
    print(f"QgsProcessingException: {message}")
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return message


def folder_listing(folder):
    """{name: (size, modification time in ns, SHA-256)} of every file in ``folder``."""
    return {
        path.name: (path.stat().st_size, path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(folder.iterdir())
    }
