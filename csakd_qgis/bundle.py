"""Model bundles: weights (``<name>.pt``) beside a JSON model card (``<name>.json``).

The card holds the config that rebuilds the network, what inputs the model accepts, how
inputs are normalised, the training data and time, validation metrics beside bicubic and GSA,
and the SHA-256 of the weights file, so a truncated or swapped weights file is caught before
torch tries to read it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Tuple, Union

import torch

from .files import atomic_output
from .model import FusionModelConfig, SubspaceFusionModel

BUNDLE_FORMAT = "csakd-model-bundle"
BUNDLE_VERSION = 1


class BundleError(ValueError):
    """A model bundle is missing, damaged or does not fit this version of the plugin."""


def default_model_path() -> Path:
    return Path(__file__).resolve().parents[1] / "resources" / "models" / "csakd_student.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path_for(path: Union[str, Path]) -> Path:
    path = Path(path)
    if path.suffix.lower() in (".pt", ".pth"):
        return path.with_suffix(".json")
    if path.suffix.lower() != ".json":
        return path.with_name(path.name + ".json")
    return path


def _atomic_write(path: Path, write) -> None:
    """Never a half-written bundle: written beside, renamed into place."""
    with atomic_output(path) as temporary:
        write(temporary)


def save_bundle(path: Union[str, Path], model: SubspaceFusionModel, card: Dict) -> Path:
    """Save ``model`` as ``<stem>.pt`` + ``<stem>.json``; returns the card's path."""
    card_path = card_path_for(path)
    weights_path = card_path.with_suffix(".pt")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_write(weights_path, lambda p: torch.save(state, p))
    full_card = dict(card)
    full_card.update(
        format=BUNDLE_FORMAT,
        format_version=BUNDLE_VERSION,
        config=model.config.to_dict(),
        weights_file=weights_path.name,
        weights_sha256=_sha256(weights_path),
    )
    _atomic_write(card_path, lambda p: Path(p).write_text(json.dumps(full_card, indent=2) + "\n"))
    return card_path


def read_card(path: Union[str, Path]) -> Dict:
    card_path = card_path_for(path)
    if not card_path.exists():
        raise BundleError(
            f"model card {card_path} not found: a model bundle is a .json model card with its .pt weights beside it"
        )
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"model card {card_path} is not valid JSON ({error}); the file is damaged") from error
    if card.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{card_path} is not a CSAKD model card (its 'format' is {card.get('format')!r})")
    if int(card.get("format_version", 0)) > BUNDLE_VERSION:
        raise BundleError(
            f"{card_path} was written by a newer plugin (bundle format {card['format_version']}); update the plugin"
        )
    return card


def load_bundle(path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu") -> Tuple[SubspaceFusionModel, Dict]:
    """Rebuild the model of a bundle in evaluation mode; raises :class:`BundleError` with the reason."""
    card_path = card_path_for(path or default_model_path())
    card = read_card(card_path)
    weights_path = card_path.with_name(card.get("weights_file", card_path.with_suffix(".pt").name))
    if not weights_path.exists():
        raise BundleError(f"weights file {weights_path} of model card {card_path.name} not found")
    if card.get("weights_sha256") and _sha256(weights_path) != card["weights_sha256"]:
        raise BundleError(
            f"weights file {weights_path} does not match its model card (checksum differs): "
            "the file is truncated or belongs to another model; copy the bundle again"
        )
    try:
        config = FusionModelConfig.from_dict(card["config"])
        model = SubspaceFusionModel(config)
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"model card {card_path} has an unusable config: {error}") from error
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as error:  # torch raises RuntimeError, pickle errors, EOFError...
        raise BundleError(f"weights {weights_path} cannot be loaded into the model its card describes: {error}") from error
    return model.to(device).eval(), card
