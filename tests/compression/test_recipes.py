"""Recipe names: what parses, what is refused (before any work), and how they print."""

import pytest

from capfleet.compression.recipes import PartRecipe, check_for_model, parse_part, parse_trial
from capfleet.core.errors import CapfleetError


def test_single_name_applies_to_both_parts():
    t = parse_trial("prune-50+int8")
    assert t.encoder == t.decoder == PartRecipe("int8", prune=0.5)
    assert t.name == "prune-50+int8:prune-50+int8"


def test_qat_alone_means_int8_encoder():
    t = parse_trial("qat-int8")
    assert (t.encoder.quant, t.decoder.quant) == ("int8", "qat-int8")
    assert t.decoder.needs_tuning and not t.encoder.needs_tuning


def test_explicit_parts_and_canonical_order():
    t = parse_trial("int8+shrink-30:fp32")
    assert t.encoder == PartRecipe("int8", shrink=0.3)
    assert t.name == "shrink-30+int8:fp32"
    assert parse_trial("fp32").name == "fp32:fp32"


@pytest.mark.parametrize(
    "text, part, message",
    [
        ("int4", "encoder", "unknown step 'int4'"),
        ("qat-int8", "encoder", "decoder only"),
        ("float16", "decoder", "encoder only"),
        ("int8+dynamic", "encoder", "more than one quantization step"),
        ("prune-50+prune-20", "decoder", "prune given twice"),
        ("prune-0", "decoder", "removes nothing"),
        ("prune-100", "decoder", "unknown step"),
        ("mixed-int8-0", "encoder", "keeps no op out of int8"),
        ("mixed-int8+mixed-int16x8-2", "decoder", "more than one quantization step"),
        ("int8+mixed-int8-2", "decoder", "more than one quantization step"),
    ],
)
def test_bad_recipes_are_refused_with_the_reason(text, part, message):
    with pytest.raises(CapfleetError, match=message):
        parse_part(text, part)


def test_mixed_int8_names_how_many_ops_stay_float():
    assert parse_part("mixed-int8", "encoder").keep_float == 0  # the settings' number
    part = parse_part("shrink-50+mixed-int8-3", "decoder")
    assert (part.quant, part.keep_float, part.shrink) == ("mixed-int8", 3, 0.5)
    assert parse_trial("mixed-int8-3:mixed-int8").name == "mixed-int8-3:mixed-int8"
    part = parse_part("mixed-int16x8-2", "encoder")
    assert (part.quant, part.keep_float, part.fallback, part.name) == (
        "mixed-int16x8",
        2,
        "int16x8",
        "mixed-int16x8-2",
    )
    assert parse_part("mixed-int8", "decoder").fallback == "float32"
    assert parse_part("int8", "decoder").fallback is None


def test_shrinking_a_frozen_backbone_is_refused():
    with pytest.raises(CapfleetError, match="vgg16 is a frozen backbone"):
        check_for_model(parse_trial("shrink-50+int8"), False, "vgg16")
    check_for_model(parse_trial("int8:shrink-50+int8"), False, "vgg16")  # decoder only: fine
