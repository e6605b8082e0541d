"""Compression recipes: names -> validated plans, refused before any work runs.

A recipe is one or more steps joined by "+", applied in this order:
    shrink-<f>   structured pruning: remove the share f% of units/channels with the smallest
                 weights, rebuild the smaller model with the kept weights, fine-tune it
    prune-<p>    magnitude pruning to sparsity p% (tfmot, fine-tuned through the caption loss;
                 one-shot where the part is a frozen backbone, which has no loss to tune on)
    qat-int8     quantization-aware training of the decoder's Dense layers, then int8
    fp32 | dynamic | float16 | int8    how the part is converted to TFLite
    mixed-int8   int8 but for the part's most sensitive ops, kept float (compression/mixed.py):
                 as many as the settings' mixed_float_ops, or K with mixed-int8-K
    mixed-int16x8  the same, the kept ops in int16x8 (int16 activations, int8 weights)
                 instead of float: smaller, integer throughout; mixed-int16x8-K

A trial names both parts, "ENCODER:DECODER" (e.g. "int8:qat-int8"), or one recipe for both
("prune-50+int8"); "qat-int8" alone means an int8 encoder with a qat-int8 decoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from capfleet.core.errors import CapfleetError

MIXED = {"mixed-int8": "float32", "mixed-int16x8": "int16x8"}  # recipe -> its kept ops' precision
QUANT = {
    "encoder": ("fp32", "dynamic", "float16", "int8", *MIXED),
    "decoder": ("fp32", "dynamic", "int8", "qat-int8", *MIXED),
}
_STEP = re.compile(r"^(prune|shrink)-(\d{1,2})$")
_MIXED_K = re.compile(r"^(mixed-int8|mixed-int16x8)-(\d{1,4})$")


@dataclass(frozen=True)
class PartRecipe:
    """What happens to one part (encoder or decoder) of a trained captioner."""

    quant: str = "fp32"  # one of QUANT[part]
    prune: float = 0.0  # target sparsity in [0, 1)
    shrink: float = 0.0  # share of units/channels removed, in [0, 1)
    keep_float: int = 0  # mixed: ops kept out of int8 (0: the settings' mixed_float_ops)

    @property
    def name(self) -> str:
        steps = []
        if self.shrink:
            steps.append(f"shrink-{round(self.shrink * 100)}")
        if self.prune:
            steps.append(f"prune-{round(self.prune * 100)}")
        if self.quant != "fp32" or not steps:
            steps.append(f"{self.quant}-{self.keep_float}" if self.keep_float else self.quant)
        return "+".join(steps)

    @property
    def fallback(self) -> str | None:
        """A mixed part's kept ops' precision (None for any other recipe)."""
        return MIXED.get(self.quant)

    @property
    def needs_tuning(self) -> bool:
        return bool(self.prune or self.shrink or self.quant == "qat-int8")


@dataclass(frozen=True)
class TrialRecipe:
    encoder: PartRecipe
    decoder: PartRecipe

    @property
    def name(self) -> str:
        return f"{self.encoder.name}:{self.decoder.name}"


def parse_part(text: str, part: str) -> PartRecipe:
    """One part's recipe, e.g. "prune-50+int8"; an unknown or impossible one is an error."""
    allowed = QUANT[part]
    quant, prune, shrink, keep = None, 0.0, 0.0, 0
    for step in text.strip().split("+"):
        m = _STEP.match(step)
        k = _MIXED_K.match(step)
        if k:
            if quant is not None:
                raise CapfleetError(f"{part} recipe {text!r}: more than one quantization step")
            keep = int(k.group(2))
            if keep < 1:
                raise CapfleetError(f"{part} recipe {text!r}: keeps no op out of int8 (use int8)")
            quant = k.group(1)
        elif step in allowed or step in ("qat-int8", "float16"):
            if step not in allowed:
                raise CapfleetError(
                    f"{part} recipe {text!r}: {step} applies to the "
                    f"{'decoder' if part == 'encoder' else 'encoder'} only"
                )
            if quant is not None:
                raise CapfleetError(f"{part} recipe {text!r}: more than one quantization step")
            quant = step
        elif m:
            kind, value = m.group(1), int(m.group(2)) / 100
            if value <= 0:
                raise CapfleetError(f"{part} recipe {text!r}: {step} removes nothing")
            if (kind == "prune" and prune) or (kind == "shrink" and shrink):
                raise CapfleetError(f"{part} recipe {text!r}: {kind} given twice")
            if kind == "prune":
                prune = value
            else:
                shrink = value
        else:
            raise CapfleetError(
                f"{part} recipe {text!r}: unknown step {step!r}; allowed: "
                f"{', '.join(allowed)}, mixed-int8-<K>, mixed-int16x8-<K>, prune-<1..99>, "
                "shrink-<1..99>, joined by '+'"
            )
    return PartRecipe(quant or "fp32", prune, shrink, keep)


def parse_trial(text: str) -> TrialRecipe:
    """ "ENCODER:DECODER" or one recipe for both parts."""
    if ":" in text:
        enc, _, dec = text.partition(":")
        return TrialRecipe(parse_part(enc, "encoder"), parse_part(dec, "decoder"))
    if "qat-int8" in text.split("+"):
        dec = parse_part(text, "decoder")
        enc = PartRecipe("int8", dec.prune, dec.shrink)
        return TrialRecipe(enc, dec)
    return TrialRecipe(parse_part(text, "encoder"), parse_part(text, "decoder"))


def check_for_model(recipe: TrialRecipe, encoder_trainable: bool, encoder: str) -> None:
    """Refuse what a model cannot take: shrinking a frozen pretrained backbone."""
    if recipe.encoder.shrink and not encoder_trainable:
        raise CapfleetError(
            f"trial {recipe.name}: shrink applies to the decoder and the small CNN only; "
            f"{encoder} is a frozen backbone (try 'int8:{recipe.decoder.name}')"
        )
