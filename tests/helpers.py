"""Helpers shared by the tests."""


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
