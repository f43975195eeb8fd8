from hypothesis import given, settings
from hypothesis import strategies as st

from data_tools.normalize import cjk_ratio, normalize_text


def test_fullwidth_letters_and_digits_fold_but_chinese_punctuation_stays():
    assert normalize_text("ＡＢＣ１２３，。！") == "ABC123，。！"


def test_nfkc_is_opt_in_and_folds_punctuation():
    assert normalize_text("，", unicode_form="NFKC") == ","


def test_html_urls_emails_control_and_zero_width_are_removed():
    text = "<p>内容&amp;丰富</p>访问https://example.com/a?b=1了解，邮件a.b@example.com。零\u200b宽\x07"
    assert normalize_text(text) == "内容&丰富 访问 了解，邮件 。零宽"


def test_whitespace_collapses_and_blank_lines_drop_but_newlines_stay():
    assert normalize_text("  多余   的\t空格 \n\n\n第二行\u3000\u3000结束 ") == "多余 的 空格\n第二行 结束"


def test_cjk_ratio_counts_visible_characters():
    assert cjk_ratio("中文ab") == 0.5
    assert cjk_ratio("") == 0.0
    assert cjk_ratio("english only") == 0.0


def test_repetition_measures():
    from data_tools.normalize import repeated_char_ratio, repeated_line_ratio

    assert repeated_line_ratio("一\n二\n一\n一") == 0.5
    assert repeated_line_ratio("只有一行") == 0.0
    assert repeated_char_ratio("哈哈哈哈好") == 0.8
    assert repeated_char_ratio("分隔线------------之后") == 0.0  # punctuation runs are layout


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(list("哈好aA0_-  \n😀😂\U00030000")), max_size=30))
def test_the_fast_paths_measure_what_the_plain_definitions_do(text):
    import re

    from data_tools.normalize import cjk_ratio, repeated_char_ratio

    runs = sum(len(m.group()) for m in re.finditer(r"(\w)\1{3,}", text))
    assert repeated_char_ratio(text) == (runs / len(text) if text else 0.0)
    visible = len(text) - text.count(" ") - text.count("\n")
    ideographs = len(re.findall(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]", text))
    assert cjk_ratio(text) == (ideographs / visible if visible > 0 else 0.0)


# Pieces that exercise every pass and the chunk path's joins: the document mark itself, line ends,
# spaces that collapse or strip, tags and entities (one decoding to a newline, one to nothing),
# URLs, e-mails, full-width letters, combining marks that NFC composes, invisible characters, runs.
_PIECES = ["\uffff", "\n", "\r", "\r\n", " ", "\t", "\u3000", "\u00a0", "<", ">", "<p>", "</b \n>", "&amp;", "&#10;",
           "&#xffff;", "&", "http://a.b/c", "www.", "a@b.cn", "@", "e", "\u0301", "Ａ", "１", "\x00", "\u200b",
           "\ufeff", "哈", "中文", "好", "😀", "\U00020001", "\ud800", "a", "-", "。"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join), max_size=6),
       st.sampled_from(["NFC", "NFKC", "none"]), st.booleans(), st.booleans())
def test_a_chunk_normalizes_and_measures_as_its_documents_do_one_by_one(texts, form, fold, strip_html):
    from data_tools.normalize import (
        chunk_measures,
        normalize_texts,
        repeated_char_ratio,
    )

    options = dict(unicode_form=form, fullwidth_to_halfwidth=fold, strip_html=strip_html)
    assert normalize_texts(texts, **options) == [normalize_text(text, **options) for text in texts]
    ratios, may_repeat = chunk_measures(texts)
    assert ratios.tolist() == [cjk_ratio(text) for text in texts]
    assert all(may or repeated_char_ratio(text) == 0.0 for text, may in zip(texts, may_repeat.tolist()))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([*_PIECES, "  ", "\u2003", "\u202f", "b.c-d@e.f.org", "@x.y", "ｚ９"]), max_size=30)
       .map("".join))
def test_the_passes_run_on_the_lines_they_change_give_what_the_whole_text_pass_gives(text):
    """Full-width folding, e-mail removal and whitespace runs are applied only to the lines a fast search
    finds something to change in: the result is the plain substitution's over the whole text."""
    from data_tools.normalize import (
        _EMAIL_RE,
        _FULLWIDTH_ALNUM_RUN_RE,
        _HORIZONTAL_SPACE_RE,
        _fold_fullwidth,
        _next_at_sign,
        _next_fullwidth,
        _NextSpaceToFold,
        _sub_in_lines,
    )

    for pattern, replacement, next_trigger in ((_FULLWIDTH_ALNUM_RUN_RE, _fold_fullwidth, _next_fullwidth),
                                               (_EMAIL_RE, " ", _next_at_sign),
                                               (_HORIZONTAL_SPACE_RE, " ", _NextSpaceToFold())):
        assert _sub_in_lines(pattern, replacement, text, next_trigger) == pattern.sub(replacement, text)


def test_chunk_cleaning_keeps_and_drops_what_the_plain_filters_do(clue_lines_file):
    from data_tools.clean import CleanConfig, clean_documents
    from data_tools.normalize import repeated_char_ratio, repeated_line_ratio

    config = CleanConfig(input_paths=[clue_lines_file], output_dir=clue_lines_file.parent / "unused")
    texts = clue_lines_file.read_text(encoding="utf-8").splitlines()[:3000]
    texts += ["哈哈哈哈哈哈哈哈好", "一行\n一行\n一行", "短", "english words only here", ""]

    def plain(text):
        text = normalize_text(text)
        checks = [(not text, "empty_after_normalization"), (len(text) < config.min_chars, "too_short"),
                  (len(text) > config.max_chars, "too_long"), (cjk_ratio(text) < config.min_cjk_ratio, "low_cjk_ratio"),
                  (repeated_line_ratio(text) > config.max_repeated_line_ratio, "repeated_lines"),
                  (repeated_char_ratio(text) > config.max_repeated_char_ratio, "repeated_chars")]
        return text, next((reason for failed, reason in checks if failed), None)

    chunked = clean_documents(texts, config)
    assert chunked == [plain(text) for text in texts]
    assert {reason for _, reason in chunked} >= {None, "too_short", "low_cjk_ratio", "repeated_lines", "repeated_chars"}
