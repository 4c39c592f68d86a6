"""Helpers shared by the engine tests."""


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
