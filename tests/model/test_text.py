import pytest

from capfleet.core.errors import DataError
from capfleet.model.text import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary, clean_caption


def test_clean_caption_follows_the_study():
    raw = "A  child in a PINK dress is climbing up a set of stairs in an entry way ."
    assert clean_caption(raw) == "child in pink dress is climbing up set of stairs in an entry way"
    # punctuation removed inside words, digits and one-letter tokens dropped
    assert clean_caption("Two dogs' toys, 3 balls & a stick!") == "two dogs toys balls stick"
    assert clean_caption("") == ""


def test_vocabulary_build_min_count_and_order():
    caps = ["red circle", "red square", "blue circle", "red star"]
    vocab = Vocabulary.build(caps, min_count=2)
    assert vocab.tokens[4:] == ("red", "circle")  # most frequent first, then alphabetical
    assert vocab.id("square") == UNK_ID
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(caps, min_count=0)


def test_encode_decode_round_trip_and_padding():
    vocab = Vocabulary.build(["small red circle", "large blue square"])
    ids = vocab.encode_batch(["small red circle", "large"], max_len=6)
    assert ids.shape == (2, 6) and ids.dtype.name == "int32"
    assert ids[0, 0] == START_ID and ids[0, 4] == END_ID and ids[0, 5] == PAD_ID
    assert list(ids[1]) == [START_ID, vocab.id("large"), END_ID, 0, 0, 0]
    assert vocab.decode(ids[0]) == "small red circle"
    # cut at max_len: no END, decode still stops at the end of the array
    assert vocab.decode(vocab.encode_batch(["small red circle"], max_len=3)[0]) == "small red"


def test_vocabulary_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["small red circle"], min_count=1)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    (tmp_path / "bad.json").write_text('{"tokens": ["a", "b"]}')
    with pytest.raises(DataError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")
