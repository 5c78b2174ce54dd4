"""originate.build_originate: the exact click-to-call line and its whitelists."""

import re
import shlex

import pytest

from fsbridge.core.originate import (
    InvalidExtension,
    InvalidIdentifier,
    InvalidNumber,
    InvalidSettings,
    OriginateError,
    OriginateSettings,
    build_originate,
    safe_caller_id_name,
)

CALL = "0d3c4b9e-1a2b-4c3d-8e4f-0123456789ab"
REQ = "7e57a11d-0000-4000-a000-00000000cafe"

# The characters that change the meaning of an originate line (freeswitch-notes.md).
DANGEROUS = ["\r", "\n", " ", "'", "\\", ",", "|", "{", "}", "[", "]", "<", ">", "=", "^", "$", "@", "/",
             ";", "%", "&", '"', "\t", "\x00"]


def build(ext="101", to="79101234567", name=None, settings=None, **ids):
    return build_originate(ext, to, call_uuid=ids.get("call_uuid", CALL), request_id=ids.get("request_id", REQ),
                           client_name=name, settings=settings or OriginateSettings())


def test_exact_default_command():
    assert build() == (
        "originate {origination_uuid=0d3c4b9e-1a2b-4c3d-8e4f-0123456789ab,"
        "fsbridge_click_to_call=7e57a11d-0000-4000-a000-00000000cafe,"
        "fsbridge_ext=101,fsbridge_phone=79101234567,"
        "origination_caller_id_number=79101234567,origination_caller_id_name='79101234567',"
        "ignore_early_media=true,originate_timeout=30}user/101 79101234567 XML default"
    )


def test_exact_command_with_settings_and_client_name():
    settings = OriginateSettings(dial_string="sofia/internal/{ext}@pbx.example.com", context="public",
                                 dialplan="XML", timeout_s=45, keep_plus=True)
    assert build(ext="2001", to="+441632960961", name="Jane Doe", settings=settings) == (
        "originate {origination_uuid=0d3c4b9e-1a2b-4c3d-8e4f-0123456789ab,"
        "fsbridge_click_to_call=7e57a11d-0000-4000-a000-00000000cafe,"
        "fsbridge_ext=2001,fsbridge_phone=+441632960961,"
        "origination_caller_id_number=+441632960961,origination_caller_id_name='Jane Doe',"
        "ignore_early_media=true,originate_timeout=45}sofia/internal/2001@pbx.example.com +441632960961 XML public"
    )


def test_plus_dropped_unless_keep_plus():
    line = build(to="+79101234567")
    assert "fsbridge_phone=79101234567," in line and line.endswith("user/101 79101234567 XML default")


def test_fixed_caller_id_overrides_client():
    settings = OriginateSettings(caller_id_number="74950000000", caller_id_name="Sales")
    line = build(name="Client", settings=settings)
    assert "origination_caller_id_number=74950000000,origination_caller_id_name='Sales'," in line
    assert "fsbridge_phone=79101234567," in line


def test_service_codes_pass():
    assert build(to="*72#").endswith("user/101 *72# XML default")


def test_the_line_is_one_token_per_argument():
    # Five arguments: originate, {vars}dialstring, number, dialplan, context.  Split
    # as FreeSWITCH does (on spaces outside single quotes): the quoted name stays whole.
    line = build(name="A B C D")
    assert len(shlex.split(line)) == 5
    assert "origination_caller_id_name='A B C D'," in line


@pytest.mark.parametrize("ch", DANGEROUS)
def test_dangerous_char_in_ext_rejected(ch):
    # Even a careless pattern letting everything through must not open the line.
    loose = OriginateSettings(extension_pattern=r".+")
    with pytest.raises(InvalidExtension):
        build(ext=f"101{ch}x", settings=loose)
    with pytest.raises(InvalidExtension):
        build(ext=f"101{ch}")


@pytest.mark.parametrize("ch", DANGEROUS + ["-", ".", "(", ")", "a", "٣"])
def test_dangerous_char_in_number_rejected(ch):
    with pytest.raises(InvalidNumber):
        build(to=f"7910{ch}1234567")


@pytest.mark.parametrize("to", ["", "+", "1" * 33, "+" + "1" * 32, "++7", "7+9", "\uff17\uff19"])
def test_bad_numbers(to):
    with pytest.raises(InvalidNumber):
        build(to=to)


def test_max_length_number_passes():
    assert f" {'1' * 32} XML" in build(to="1" * 32)
    assert f" {'1' * 31} XML" in build(to="+" + "1" * 31)


@pytest.mark.parametrize("ch", DANGEROUS)
def test_dangerous_char_in_client_name_neutralised(ch):
    line = build(name=f"Ivan{ch}Petrov{ch}")
    assert "origination_caller_id_name='Ivan Petrov'," in line


def test_hostile_name_cannot_add_variables_or_legs():
    line = build(name="x},origination_uuid=evil,{[a=b]user/666|sofia/gw/${system(rm)}")
    vars_block = re.fullmatch(r"originate \{([^{}]*)\}user/101 79101234567 XML default", line)
    assert vars_block, line
    names = [kv.split("=", 1)[0] for kv in vars_block.group(1).split(",")]
    assert names.count("origination_uuid") == 1 and len(names) == 8


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Иванов Иван Иванович", "Иванов Иван Иванович"),
        ("Иванов_Иван", "Иванов_Иван"),
        ("a\tb\nc", "a b c"),
        ("  O'Brien & Sons, Ltd.  ", "O Brien Sons Ltd."),
        ("a\u0301", "á"),  # composed, not a bare combining mark
        ("😀💥", ""),
        ("x" * 100, "x" * 48),
        ("ab" + " " * 60 + "cd", "ab cd"),
        ("١٢٣", ""),  # non-ASCII digits are not ASCII digits
    ],
)
def test_safe_caller_id_name(raw, expected):
    assert safe_caller_id_name(raw) == expected


def test_name_without_safe_characters_falls_back_to_number():
    assert "origination_caller_id_name='79101234567'," in build(name="$$$ {}")


@pytest.mark.parametrize("bad", ["", "0D3C4B9E-1A2B-4C3D-8E4F-0123456789AB", "0d3c4b9e1a2b4c3d8e4f0123456789ab",
                                 "0d3c4b9e-1a2b-1c3d-8e4f-0123456789ab", CALL + "\n", CALL + ",x=1"])
def test_identifiers_must_be_uuid4(bad):
    with pytest.raises(InvalidIdentifier):
        build(call_uuid=bad)
    with pytest.raises(InvalidIdentifier):
        build(request_id=bad)


def test_extension_pattern_is_fullmatched():
    with pytest.raises(InvalidExtension):
        build(ext="1")
    with pytest.raises(InvalidExtension):
        build(ext="1234567")
    with pytest.raises(InvalidExtension):
        build(ext="101\n")
    assert "fsbridge_ext=ops-1," in build(ext="ops-1", settings=OriginateSettings(extension_pattern=r"[a-z]+-\d"))


@pytest.mark.parametrize(
    "template",
    ["user/101", "user/{ext} x", "user/{ext},user/102", "{ext}|user/1", "user/{ext}@${domain}", "{0}/{ext}",
     "{ext.__class__}{ext}", "[leg_timeout=5]user/{ext}", "user/{ext};fs_path=x", "user/{ext}'", "user/{ext}\n",
     "{origination_uuid=x}user/{ext}"],
)
def test_dial_string_template_validated(template):
    with pytest.raises(InvalidSettings):
        OriginateSettings(dial_string=template)


@pytest.mark.parametrize(
    "kwargs",
    [{"context": "default public"}, {"context": ""}, {"dialplan": "XML,x"}, {"timeout_s": 0},
     {"timeout_s": 601}, {"timeout_s": True}, {"timeout_s": 30.5}, {"extension_pattern": "("},
     {"caller_id_number": "123 4"}, {"caller_id_name": "Sales, Dept"}, {"caller_id_name": "Sales  Dept"}],
)
def test_bad_settings(kwargs):
    with pytest.raises(InvalidSettings):
        OriginateSettings(**kwargs)


def test_errors_are_value_errors():
    assert issubclass(OriginateError, ValueError)
    for cls in (InvalidSettings, InvalidExtension, InvalidNumber, InvalidIdentifier):
        assert issubclass(cls, OriginateError)


# --- click-to-call policy (issue 14) ---------------------------------------------

from fsbridge.core.originate import CallPolicy, RateLimiter, check_destination  # noqa: E402

POLICY = CallPolicy()


@pytest.mark.parametrize("to,why", [
    ("+78091234567", "premium-rate"),
    ("+19005551234", "allowed_countries"),
    ("+8821234567", "not a valid"),
    ("112", "emergency"),
    ("01", "emergency"),
    ("*0101", "feature codes"),
    ("**101", "feature codes"),
    ("*98", "feature codes"),
    ("#21#", "feature codes"),
    ("+442079460000", "allowed_countries"),
    ("1234567890123", "not a valid"),
])
def test_policy_refuses_by_default(to, why):
    verdict = check_destination(to, POLICY)
    assert verdict.dial is None and why in verdict.reason


@pytest.mark.parametrize("to,dial", [
    ("+79101234567", "79101234567"),
    ("89101234567", "79101234567"),
    ("+74951234567", "74951234567"),
    ("+78001234567", "78001234567"),  # toll-free is fine
    ("205", "205"),  # an extension
])
def test_policy_allows_ordinary_numbers(to, dial):
    assert check_destination(to, POLICY).dial == dial


def test_international_numbers_keep_their_plus():
    policy = CallPolicy(allowed_countries=("RU", "GB", "DE"))
    assert check_destination("+442079460000", policy).dial == "+442079460000"
    assert check_destination("+4930123456", policy).dial == "+4930123456"
    assert check_destination("+79101234567", CallPolicy(keep_plus=True)).dial == "+79101234567"


def test_allow_and_deny_prefixes():
    policy = CallPolicy(allow_prefixes=("+7809", "103"), deny_prefixes=("+7495",))
    assert check_destination("+78091234567", policy).dial == "+78091234567"
    assert check_destination("103", policy).dial == "103"
    assert "deny_prefixes" in check_destination("+74951234567", policy).reason
    assert "deny_prefixes" in check_destination("84951234567", policy).reason
    both = CallPolicy(allow_prefixes=("+7",), deny_prefixes=("+7809",))
    assert check_destination("+78091234567", both).dial is None  # deny wins


def test_rate_limiter_per_key_and_total():
    limiter = RateLimiter(per_key=3, total=5, window_s=60)
    assert [limiter.allow("101", 0.0) for _ in range(4)][-1] is not None  # 4th from 101 refused
    assert limiter.allow("102", 1.0) is None and limiter.allow("102", 1.0) is None
    assert "in total" in limiter.allow("103", 2.0)
    assert limiter.allow("101", 61.0) is None  # the window slid
