"""peftjax.data.tokenize_text: a corpus tokenized piece by piece gives one call's ids."""

import numpy as np
import pytest

from _model_fixtures import minilm, smollm2
from peftjax import data as data_lib


@pytest.mark.parametrize("model", [minilm, smollm2], ids=["wordpiece", "byte_level_bpe"])
def test_pieces_give_the_ids_of_one_call(model):
  _, (_, _, tok) = model()
  text = data_lib.moby_dick("test")   # ~100k characters, chapters, blank lines, dialogue
  want = np.asarray(tok(text, verbose=False)["input_ids"], np.int32)
  assert data_lib._splits_at_line_breaks(tok)
  for chunk in (500, 4096, data_lib.TOKENIZE_CHUNK):
    got = data_lib.tokenize_text(tok, text, chunk=chunk)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_cut_points_are_single_line_breaks_between_words():
  text = "aa\n\nbb\n  cc\ndd ee\nff"
  cuts, i = [], 0
  while i < len(text):
    i = data_lib._cut(text, i, i + 3)
    cuts.append(i)
  assert cuts == [text.index("dd"), text.index("ff"), len(text)]
  assert "".join(text[a:b] for a, b in zip([0] + cuts, cuts)) == text
  assert data_lib._cut("no line breaks at all", 0, 4) == len("no line breaks at all")


class _PrefixingTokenizer:
  """Marks the start of every call's text, as a SentencePiece tokenizer with a dummy prefix."""

  def __call__(self, text, add_special_tokens=True, verbose=True):
    ids = [1000] + [ord(c) for c in text]
    return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_a_tokenizer_that_marks_each_call_gets_one_call():
  tok = _PrefixingTokenizer()
  assert not data_lib._splits_at_line_breaks(tok)
  text = "line one\nline two\n" * 50
  np.testing.assert_array_equal(data_lib.tokenize_text(tok, text, chunk=16),
                                tok(text)["input_ids"])


def test_general_text_and_its_windows_spread_over_the_whole_text():
  from peftjax import tasks
  text = data_lib.general_text("speeches")
  assert text.count("\n\n") >= 188 and "Madam Chairwoman" in text and 7e5 < len(text) < 8e5
  ids = np.arange(10 * 9, dtype=np.int32)         # 10 windows of seq_len + 1 = 9 tokens
  loader = tasks._spread_windows(ids, 4, 8, 2, what="t")
  got = np.concatenate([b["input_ids"] for b in loader.epoch_iter()])
  np.testing.assert_array_equal(got[:, 0], [0, 27, 54, 81])   # windows 0, 3, 6 and 9
  with pytest.raises(ValueError, match="t: 90 tokens make 10 windows of 9 tokens; 11 are needed"):
    tasks._spread_windows(ids, 11, 8, 2, what="t")
  with pytest.raises(ValueError, match="unknown general text 'nope'"):
    data_lib.general_text("nope")
