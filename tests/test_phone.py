"""fsbridge.core.phone: one canonical form per number, and nothing unsafe reaches an originate line."""

import pytest

from fsbridge.core.phone import (
    MAX_DIAL_LENGTH,
    clean_dial_number,
    dial_number,
    looks_like_extension,
    normalize_phone,
    normalizer,
)

EXT = r"^\d{2,6}$"

SAME_RU_NUMBER = [
    "+79101234567",
    "89101234567",
    "79101234567",
    "(910) 123-45-67",
    "+7 (910) 123-45-67",
    " 8 910 123 45 67 ",
    "8-910-123-45-67",
    "+7.910.123.45.67",
]


@pytest.mark.parametrize("raw", SAME_RU_NUMBER)
def test_russian_formats_are_one_number(raw):
    assert normalize_phone(raw) == "79101234567"
    assert normalize_phone(raw, "RU", "e164") == "+79101234567"


def test_region_decides_numbers_without_country_code():
    assert normalize_phone("(650) 253-0000", "US") == "16502530000"
    assert normalize_phone("(650) 253-0000", "us", "e164") == "+16502530000"
    # With an explicit country code the region does not matter.
    assert normalize_phone("+44 20 7946 0958", "RU") == "442079460958"
    # Russia's international prefix 810 is understood in region RU.
    assert normalize_phone("8 10 44 20 7946 0958", "RU") == "442079460958"


@pytest.mark.parametrize(
    "raw, digits, e164",
    [
        ("112", "112", "112"),  # short code: not a valid full number
        ("101", "101", "101"),  # an extension
        ("+123", "123", "+123"),  # '+' kept in e164 output only: it says "international"
        ("00 49 30 1234567", "0049301234567", "0049301234567"),  # not misread as +700...
        ("7910123456", "7910123456", "7910123456"),  # one digit short
        ("+7 999", "7999", "+7999"),  # not a valid number: digits, never dropped
        ("tel:+7 999", "7999", "7999"),  # '+' kept only when it leads
    ],
)
def test_unparsable_numbers_go_through_digits_only(raw, digits, e164):
    assert normalize_phone(raw) == digits
    assert normalize_phone(raw, output="e164") == e164


@pytest.mark.parametrize("raw", ["", "   ", " anonymous ", "+", "x" * 1000, "${system(id)}", "<b>hi</b>"])
def test_text_without_digits_never_goes_out_verbatim(raw):
    assert normalize_phone(raw) == "anonymous"
    assert normalize_phone(raw, output="e164") == "anonymous"


def test_very_long_input_is_not_parsed_but_kept_as_digits():
    raw = "7910" * 30
    assert normalize_phone(raw) == raw


def test_bad_output_format_is_a_programming_error():
    with pytest.raises(ValueError, match="output"):
        normalize_phone("79101234567", output="national")


@pytest.mark.parametrize("region,output", [("RU", "digits"), ("ru", "e164"), ("US", "e164")])
def test_normalizer_is_normalize_phone_with_one_sections_settings(region, output):
    normalize = normalizer(region, output)
    for raw in SAME_RU_NUMBER + ["(650) 253-0000", "101", "anonymous"]:
        assert normalize(raw) == normalize_phone(raw, region, output)


def test_normalizer_refuses_a_bad_output_format_when_made_not_when_used():
    with pytest.raises(ValueError, match="output"):
        normalizer("RU", "national")


def test_normalisation_is_cached_and_stable():
    first = normalize_phone("+7 (910) 123-45-67")
    assert all(normalize_phone("+7 (910) 123-45-67") == first for _ in range(100))


@pytest.mark.parametrize("raw", ["101", "12", "123456"])
def test_extensions(raw):
    assert looks_like_extension(raw, EXT)


@pytest.mark.parametrize("raw", ["1", "1234567", "79101234567", "101\n", " 101", "10a", "+101", ""])
def test_not_extensions(raw):
    # "101\n" is the trap of re.search with '$': the whole string must match.
    assert not looks_like_extension(raw, EXT)


def test_extension_with_trailing_newline_inside_is_refused():
    assert not looks_like_extension("10\n1", EXT)
    assert looks_like_extension("sales", r"^[a-z]+$")


@pytest.mark.parametrize(
    "raw, keep_plus, expected",
    [
        ("79101234567", False, "79101234567"),
        ("+7 (910) 123-45-67", False, "79101234567"),
        ("+7 (910) 123-45-67", True, "+79101234567"),
        ("8.910.123.45.67", True, "89101234567"),
        ("*72", False, "*72"),
        ("#31#79101234567", False, "#31#79101234567"),
        ("1" * MAX_DIAL_LENGTH, False, "1" * MAX_DIAL_LENGTH),
        ("+" + "1" * (MAX_DIAL_LENGTH - 1), True, "+" + "1" * (MAX_DIAL_LENGTH - 1)),
    ],
)
def test_clean_dial_number_accepts(raw, keep_plus, expected):
    assert clean_dial_number(raw, keep_plus) == expected


INJECTIONS = [
    "7910 123,4567",
    "7910|1234567",
    "7910{x=1}1234567",
    "{origination_caller_id_number=1}79101234567",
    "79101234567}",
    "7910${system(id)}",
    "$79101234567",
    "7910'1234567",
    '7910"1234567',
    "79101234567\nbgapi hupall",
    "79101234567\r",
    "7910\t1234567",
    "79101234567&park",
    "79101234567;",
    "79101234567@evil",
    "sofia/gateway/x/79101234567",
    "7910%201234567",
    "7910[leg_timeout=1]",
    "7910<1234567>",
    "7910^1234567",
    "7910\\1234567",
    "7910=1234567",
    "79+101234567",  # '+' only leading
    "++79101234567",
    "７９１０１２３４５６７",  # full-width digits are not ASCII digits
    "",
    "+",
    " - . ( ) ",
    "1" * (MAX_DIAL_LENGTH + 1),
]


@pytest.mark.parametrize("raw", INJECTIONS)
@pytest.mark.parametrize("keep_plus", [False, True])
def test_clean_dial_number_refuses_injection(raw, keep_plus):
    assert clean_dial_number(raw, keep_plus) is None


def test_clean_dial_number_refuses_non_strings():
    assert clean_dial_number(None, False) is None  # type: ignore[arg-type]
    assert clean_dial_number(79101234567, False) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw, keep_plus, expected",
    [
        ("8 (910) 123-45-67", False, "79101234567"),
        ("8 (910) 123-45-67", True, "+79101234567"),
        ("+44 20 7946 0958", False, "442079460958"),  # '+' read before it is dropped
        ("+44 20 7946 0958", True, "+442079460958"),
        ("102", True, "102"),  # extension: dialled as typed
        ("*72", False, "*72"),
        ("112", False, "112"),
        ("+123", True, "+123"),  # not parsable: cleaned digits, '+' per keep_plus
        ("+123", False, "123"),
    ],
)
def test_dial_number(raw, keep_plus, expected):
    assert dial_number(raw, region="RU", keep_plus=keep_plus, extension_pattern=EXT) == expected


@pytest.mark.parametrize("raw", INJECTIONS)
def test_dial_number_refuses_what_clean_refuses(raw):
    assert dial_number(raw, region="RU", keep_plus=True, extension_pattern=EXT) is None
