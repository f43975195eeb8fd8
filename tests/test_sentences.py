from data_tools.sentences import split_sentences


def test_splits_at_chinese_enders_and_keeps_them():
    assert split_sentences("今天天气很好。我们去公园吧！你去吗？") == ["今天天气很好。", "我们去公园吧！", "你去吗？"]


def test_consecutive_enders_stay_together():
    assert split_sentences("真的吗？！是的。") == ["真的吗？！", "是的。"]


def test_closing_quotes_and_brackets_follow_the_ender():
    assert split_sentences("他说：“好的。”然后走了。") == ["他说：“好的。”", "然后走了。"]
    assert split_sentences("（这是括号里的话。）下一句！") == ["（这是括号里的话。）", "下一句！"]
    assert split_sentences("《书名》很好看！」后面") == ["《书名》很好看！」", "后面"]


def test_ellipses_end_sentences():
    assert split_sentences("然后……再见…好") == ["然后……", "再见…", "好"]


def test_semicolons_end_sentences():
    assert split_sentences("第一；第二;第三") == ["第一；", "第二;", "第三"]


def test_latin_full_stops_decimals_and_abbreviations_do_not_split():
    assert split_sentences("价格是3.14元，U.S.A. 的 Dr. Smith 说。") == ["价格是3.14元，U.S.A. 的 Dr. Smith 说。"]


def test_newlines_end_sentences_and_empty_segments_vanish():
    assert split_sentences("第一行\n\n  \n第二行。\n") == ["第一行", "第二行。"]
    assert split_sentences("") == []
    assert split_sentences(" \n\t") == []


def test_a_document_of_only_enders_is_one_sentence():
    assert split_sentences("。。。") == ["。。。"]
