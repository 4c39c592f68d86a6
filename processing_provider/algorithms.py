"""The algorithms the provider offers, in one place so the provider stays generic."""


def available_algorithms():
    """Return fresh algorithm instances; QGIS takes ownership of each one."""
    from .fusion_algorithm import HyperspectralFusionAlgorithm
    from .training_algorithm import TrainFusionModelAlgorithm

    return [HyperspectralFusionAlgorithm(), TrainFusionModelAlgorithm()]
