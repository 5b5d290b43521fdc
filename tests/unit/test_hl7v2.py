"""HL7 v2 messages: the 23 real sample messages, hand-made edge cases, and hostile input."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibemrss.domain.normalize.errors import ParseError
from fibemrss.domain.normalize.plausibility import check_observation
from fibemrss.domain.normalize.ucum import normalize_unit
from fibemrss.domain.records import LOINC, SNOMED
from services.emr_gateway.core.parsers.hl7v2 import LOCAL_SYSTEM_PREFIX, Hl7Parse, parse_message

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HL7_DIR = SHARED / "hl7v2"
REAL_MESSAGES = sorted(HL7_DIR.glob("*.hl7")) if HL7_DIR.is_dir() else []

needs_shared = pytest.mark.skipif(
    not REAL_MESSAGES, reason=f"shared data not found at {HL7_DIR} (checked out without ../shared/data)"
)

# Expected fate of each real message (from MSH-9 in shared/data/hl7v2/README.md).
EXPECTED = {
    "ADT-A01-01.hl7": ("mapped", "ADT^A01"),
    "ADT-A01-02.hl7": ("mapped", "ADT^A01"),
    "ADT-A02-01.hl7": ("mapped", "ADT^A02"),
    "ADT-A03-01.hl7": ("mapped", "ADT^A03"),
    "ADT-A04-01.hl7": ("mapped", "ADT^A04"),
    "ADT-A08-01.hl7": ("mapped", "ADT^A08"),
    "ADT01-28.hl7": ("mapped", "ADT^A01"),
    "ADT04-251.hl7": ("mapped", "ADT^A04"),
    "DFT-P03-01.hl7": ("unsupported", "DFT^P03"),
    "IZ_1_1.1_Admin_Child_Max_Message.hl7": ("unsupported", "VXU^V04"),
    "LRI_2.0-NG_CBC_Typ_Message.hl7": ("mapped", "ORU^R01"),
    "MDHHS-OML-O21-1.hl7": ("unsupported", "OML^O21"),
    "MDM-T02-03.hl7": ("unsupported", "MDM^T02"),
    "OML-O21-01.hl7": ("unsupported", "OML^O21"),
    "ORM-O01-01.hl7": ("unsupported", "ORM^O01"),
    "ORU-R01-01.hl7": ("mapped", "ORU^R01"),
    "OUL-R22-01.hl7": ("mapped", "OUL^R22"),
    "OUL-R23-01.hl7": ("mapped", "OUL^R23"),
    "OUL-R24-01.hl7": ("mapped", "OUL^R24"),
    "PC1-Problem-Add-v2.3.1.hl7": ("unsupported", "PPR^PC1"),
    "RDE-O11-01.hl7": ("unsupported", "RDE^O11"),
    "SIU-S12-01.hl7": ("unsupported", "SIU^S12"),
    "VXU-V04-01.hl7": ("unsupported", "VXU^V04"),
}


def fields(error: ParseError) -> list[str]:
    return [v.field for v in error.field_violations]


def _raw_segments(path: Path) -> list[list[str]]:
    """The message split by hand, independently of the parser (these files use `|^~\\&`)."""
    text = path.read_bytes().decode("utf-8-sig")
    return [line.split("|") for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


# --- real data ------------------------------------------------------------------------------


@needs_shared
def test_expected_table_lists_every_real_message() -> None:
    assert {p.name for p in REAL_MESSAGES} == set(EXPECTED)


@needs_shared
@pytest.mark.parametrize("path", REAL_MESSAGES, ids=lambda p: p.name)
def test_every_real_message_gets_a_clear_outcome(path: Path) -> None:
    outcome, message_type = EXPECTED[path.name]
    result = parse_message(path.read_bytes())
    assert (result.outcome, result.message_type) == (outcome, message_type)
    if outcome == "unsupported":
        assert message_type in result.reason and result.records == ()
    else:
        assert result.reason == "" and len(result.records) == 1
        record = result.records[0]
        assert record.source_patient_id and record.provenance.source_id == record.source_patient_id
        assert len(record.provenance.payload_sha256) == 64


@needs_shared
@pytest.mark.parametrize(
    "path", [p for p in REAL_MESSAGES if p.name.startswith(("ORU", "OUL", "LRI"))], ids=lambda p: p.name
)
def test_every_numeric_obx_of_a_result_message_becomes_an_observation(path: Path) -> None:
    segments = _raw_segments(path)
    control_id = segments[0][9]
    (record,) = parse_message(path.read_bytes()).records
    by_source = {o.source_id: o for o in record.observations}
    numeric = 0
    obx_index = 0
    for seg in segments:
        if seg[0] != "OBX":
            continue
        obx_index += 1
        if seg[2] != "NM":
            continue
        numeric += 1
        code = seg[3].split("^")[0]
        unit = normalize_unit(seg[6].split("^")[0]) if len(seg) > 6 else None
        values = seg[5].split("~")
        for rep, text in enumerate(values):
            source_id = f"{control_id}/OBX[{obx_index}]" + (f"#{rep + 1}" if rep else "")
            o = by_source[source_id]
            assert (o.code.system, o.code.code, o.unit) == (LOINC, code, unit)
            assert o.value == (float(text) if text else None)
    assert numeric > 0


@needs_shared
def test_nist_cbc_results_with_codes_units_utc_times_and_a_unit_mistake() -> None:
    result = parse_message((HL7_DIR / "LRI_2.0-NG_CBC_Typ_Message.hl7").read_bytes())
    (record,) = result.records
    assert record.provenance.source_system == "NIST Test Lab APP@NIST Lab Facility"
    assert record.source_patient_id == "PATID1234"
    assert (record.sex, record.birth_date) == ("male", date(1961, 6, 15))
    numeric = [o for o in record.observations if o.value is not None]
    coded = [o for o in record.observations if o.value_code is not None]
    assert len(numeric) == 19 and len(coded) == 6
    assert all(o.value_code.system == SNOMED for o in coded if o.value_code)
    # OBX-14 20110103143428-0800 is 22:34:28 UTC.
    assert {o.effective for o in record.observations} == {datetime(2011, 1, 3, 22, 34, 28, tzinfo=UTC)}
    units = {o.code.code: o.unit for o in numeric}
    assert units["26464-8"] == "{cells}/uL" and units["789-8" if "789-8" in units else "26453-1"] == "10*6/uL"
    # The sample writes hemoglobin in g/mL: plausibility catches it and names the likely unit.
    hemoglobin = record.observation(LOINC, "718-7")
    assert hemoglobin is not None
    assert check_observation(hemoglobin) == [
        "value 12.5 g/mL is implausible for 718-7 (plausible 1-26 g/dL); it looks like a g/dL value (12.5 g/dL)"
    ]
    assert [n.field for n in result.notes] == ["OBX[26]-2", "OBX[27]-2", "OBX[28]-2"]  # TX results


@needs_shared
def test_adt_demographics_visit_diagnosis_and_provenance() -> None:
    result = parse_message((HL7_DIR / "ADT-A01-01.hl7").read_bytes())
    (record,) = result.records
    assert record.source_patient_id == "PATID1234"  # PID-3, the MR identifier
    assert record.provenance.source_system == "ADTApp@GHHSFacility"
    assert record.sex == "male"
    assert record.birth_date == date(1988, 8, 18)  # 198808181126+0215: the local calendar date
    (encounter,) = record.encounters
    assert encounter.source_id == "40007716"  # PV1-19
    assert encounter.class_code == "PRENC"  # PV1-2 "P"
    assert encounter.start == datetime(2015, 2, 8, 10, 24, 19, tzinfo=UTC)  # 20150208113419+0110
    (condition,) = record.conditions
    assert (condition.code.system, condition.code.code) == (SNOMED, "422504002")
    assert all(o.source_id.startswith("MSG00001/OBX[") for o in record.observations)


@needs_shared
@pytest.mark.parametrize("name", ["LRI_2.0-NG_CBC_Typ_Message.hl7", "ADT04-251.hl7", "ORU-R01-01.hl7"])
def test_separators_and_byte_order_mark_do_not_change_the_result(name: str) -> None:
    text = (HL7_DIR / name).read_bytes().decode("utf-8-sig")
    lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    variants = [
        "\r".join(lines),
        "\n".join(lines) + "\n",
        "\r\n".join(lines) + "\r\n",
        "\ufeff" + "\r".join(lines),
        "\x0b" + "\r".join(lines) + "\x1c\r",  # MLLP framing
        "\n\r".join(lines),  # LF then CR: a blank segment between each two
        "".join(line + ("\r", "\n", "\r\n", "\r\r\n \n")[i % 4] for i, line in enumerate(lines)),
    ]
    results = [parse_message(v.encode()) for v in variants] + [parse_message(v) for v in variants]
    assert all(r == results[0] for r in results)


# --- hand-made messages ---------------------------------------------------------------------


def message(
    *segments: str, msh: str = "MSH|^~\\&|LAB|HOSP|GW|HOSP|20240301083000+0100||ORU^R01^ORU_R01|C42|P|2.5.1"
) -> str:
    return "\r".join([msh, *segments])


PID = "PID|1||MRN9^^^HOSP^MR~555^^^SSA^SS||Doe^Jane||19700517|F"


def test_obx_value_types_units_times_and_local_codes() -> None:
    result = parse_message(
        message(
            PID,
            "OBR|1|||57698-3^Lipid panel^LN|||20240301080000+0100",
            "OBX|1|NM|2093-3^Cholesterol^LN||5.2|mg/dl^^UCUM|||||F",
            "OBX|2|SN|2345-7^Glucose^LN||=^99|mg/dL|||||F|||20240301091500-0500",
            "OBX|3|SN|2345-7^Glucose^LN||<^40|mg/dL|||||F",
            "OBX|4|CWE|X1^Thing^99LOCAL||POS^Positive^L|||||F",
            "OBX|5|NM|8867-4^HR^LN||72|bpm|||||W",
            "OBX|6|ST|8867-4^HR^LN||seventy||||||F",
        )
    )
    (record,) = result.records
    chol, glucose, coded = record.observations
    assert (chol.value, chol.unit, chol.effective) == (5.2, "mg/dL", datetime(2024, 3, 1, 7, 0, tzinfo=UTC))
    assert check_observation(chol)[0].endswith("it looks like a mmol/L value (201 mg/dL)")
    assert (glucose.value, glucose.effective) == (99.0, datetime(2024, 3, 1, 14, 15, tzinfo=UTC))
    assert (coded.code.system, coded.code.code) == (LOCAL_SYSTEM_PREFIX + "99LOCAL", "X1")
    assert coded.value_code is not None and coded.value_code.system == LOCAL_SYSTEM_PREFIX + "L"
    assert {n.field for n in result.notes} == {"OBX[3]-5", "OBX[5]-11", "OBX[6]-2"}


def test_timestamps_without_offset_use_the_feed_time_zone() -> None:
    text = message(PID, "OBX|1|NM|8867-4^HR^LN||72|/min|||||F|||202403010830")
    assert parse_message(text).records[0].observations[0].effective == datetime(2024, 3, 1, 8, 30, tzinfo=UTC)
    eastern = timezone(timedelta(hours=-5))
    local = parse_message(text, default_tz=eastern).records[0].observations[0]
    assert local.effective == datetime(2024, 3, 1, 13, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("code", "sex"), [("M", "male"), ("F", "female"), ("O", "other"), ("U", "unknown"), ("", None)]
)
def test_pid8_sex(code: str, sex: str | None) -> None:
    text = message(
        f"PID|1||MRN9^^^HOSP^MR||Doe^Jane||19700517|{code}", msh="MSH|^~\\&|A|B|||20240301||ADT^A04|C1|P|2.3"
    )
    assert parse_message(text).records[0].sex == sex


def test_escapes_custom_delimiters_and_pid2_fallback() -> None:
    text = "\r".join(
        [
            "MSH#*!@%#APP\\T\\X#FAC#####ADT*A08#C7#P#2.4",
            "PID#1#OLD7" + "#" * 5 + "19700517#F",
            "PV1#1#E" + "#" * 17 + "V100" + "#" * 25 + "20240301083000+0000",
        ]
    )
    result = parse_message(text)
    (record,) = result.records
    assert record.source_patient_id == "OLD7"  # PID-3 empty: PID-2 (v2.3 external id)
    assert record.provenance.source_system == "APP\\T\\X@FAC"  # "@" is this message's escape, not "\"
    (encounter,) = record.encounters
    assert (encounter.source_id, encounter.class_code) == ("V100", "EMER")
    assert encounter.start == datetime(2024, 3, 1, 8, 30, tzinfo=UTC)
    assert [n.field for n in result.notes] == ["PID[1]-3"]


def test_escape_sequences_are_decoded() -> None:
    text = message(PID, "OBX|1|CWE|X1^A\\T\\B^L||C\\S\\D^x\\F\\y^L|||||F")
    (obs,) = parse_message(text).records[0].observations
    assert obs.code.display == "A&B"
    assert obs.value_code is not None and (obs.value_code.code, obs.value_code.display) == ("C^D", "x|y")


def test_unsupported_types_and_versions_are_outcomes_not_errors() -> None:
    ack = parse_message("MSH|^~\\&|A|B|C|D|20240301||ACK|C1|P|2.5\rMSA|AA|C0")
    assert (ack.outcome, ack.message_type) == ("unsupported", "ACK")
    assert "ACK" in ack.reason
    old = parse_message(message(PID, msh="MSH|^~\\&|A|B|||20240301||ADT^A01|C1|P|2.2"))
    assert old.outcome == "unsupported" and "2.2" in old.reason
    a05 = parse_message(message(PID, msh="MSH|^~\\&|A|B|||20240301||ADT^A05|C1|P|2.5"))
    assert a05.outcome == "unsupported" and "ADT^A05" in a05.reason


@pytest.mark.parametrize(
    ("text", "field", "description"),
    [
        ("", "MSH", "message does not start with an MSH segment"),
        ("hello world", "MSH", "message does not start with an MSH segment"),
        ("MSH", "MSH-1", "field separator missing"),
        ("MSH|^~|A", "MSH-2", "encoding characters must be 4 or 5 distinct punctuation marks"),
        ("MSH|^~\\&|A|B|C|D|20240301|||C1|P|2.5", "MSH-9", "message type missing"),
        ("MSH|^~\\&|A|B|C|D|20240301||ADT^A01||P|2.5", "MSH-10", "message control id missing"),
        ("MSH|^~\\&|A|B|C|D|20240301||ADT^A01|C1|P|", "MSH-12", "version id missing"),
        ("MSH|^~\\&|A|B|C|D|20240301||ADT^A01|C1|P|2.5\rthis is not a segment", "segment[1]", None),
        (
            message("OBX|1|NM|8867-4^HR^LN||72|/min", PID),
            "OBX[1]",
            "comes before any PID: no patient to attach it to",
        ),
        (message("PV1|1|I"), "PID", "patient identification segment missing"),
        (message("PID|1||^^^HOSP^MR"), "PID[1]-3", "patient identifier missing"),
        (message(PID, "OBX|1|NM|8867-4^HR^LN||seventy|/min"), "OBX[1]-5", "is not a number (value type NM)"),
        (message(PID, "OBX|1|NM|8867-4^HR^LN||1e5|/min"), "OBX[1]-5", "is not a number (value type NM)"),
        (message(PID, "OBX|1|NM|^^LN||72|/min"), "OBX[1]-3", "observation identifier missing"),
        (message(PID, "OBX|1|NM|8867-4^HR^LN||72|/min|||||F|||20241301"), "OBX[1]-14", None),
        (message("PID|1||M1^^^H^MR||X||1970023"), "PID[1]-7", None),
        (message(PID, "PV1|1|I" + "|" * 42 + "20240302|20240301"), "PV1[1]-45", None),
    ],
)
def test_structural_garbage_raises_parse_error_naming_the_field(
    text: str, field: str, description: str | None
) -> None:
    with pytest.raises(ParseError) as exc:
        parse_message(text)
    assert fields(exc.value) == [field]
    if description is not None:
        assert exc.value.field_violations[0].description == description


def test_non_utf8_is_refused_unless_msh18_says_latin1() -> None:
    latin = "MSH|^~\\&|A|B|||20240301||ADT^A04|C1|P|2.5|||||8859/1\rPID|1||M\xfcller^^^H^MR".encode("latin-1")
    assert parse_message(latin).records[0].source_patient_id == "Müller"
    with pytest.raises(ParseError) as exc:
        parse_message(latin.replace(b"8859/1", b"UNICODE"))
    assert fields(exc.value) == ["MSH-18"]


# --- property tests: hostile input never escapes as anything but ParseError ------------------


def _parse_or_parse_error(payload: bytes | str) -> Hl7Parse | None:
    try:
        result = parse_message(payload)
    except ParseError as exc:
        assert exc.field_violations and all(v.field and v.description for v in exc.field_violations)
        return None
    assert result.outcome in ("mapped", "unsupported")
    return result


HL7_ALPHABET = st.sampled_from(list("|^~\\&\r\n0123456789.+-ABCDEFLMNOPRSXZ #T"))
hl7_text = st.text(HL7_ALPHABET, max_size=40)


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=300))
def test_random_bytes(payload: bytes) -> None:
    _parse_or_parse_error(payload)


@settings(max_examples=300, deadline=None)
@given(
    header=st.sampled_from(["MSH|^~\\&|", "MSH|^~\\&#|", "\ufeffMSH|^~\\&|", "MSH"]),
    tail=st.text(max_size=200) | st.lists(hl7_text, max_size=20).map("|".join),
)
def test_random_text_after_an_msh(header: str, tail: str) -> None:
    _parse_or_parse_error(header + tail)


REAL_TEXTS = [p.read_bytes().decode("utf-8-sig") for p in REAL_MESSAGES]


@needs_shared
@settings(max_examples=300, deadline=None)
@given(
    which=st.integers(min_value=0),
    mutations=st.lists(
        st.tuples(
            st.integers(min_value=0), st.integers(min_value=0), st.one_of(hl7_text, st.text(max_size=6))
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_real_messages(which: int, mutations: list[tuple[int, int, str]]) -> None:
    lines = [line.split("|") for line in REAL_TEXTS[which % len(REAL_TEXTS)].splitlines()]
    for seg_index, field_index, replacement in mutations:
        fields_ = lines[seg_index % len(lines)]
        fields_[field_index % len(fields_)] = replacement
    _parse_or_parse_error("\r".join("|".join(f) for f in lines))


@needs_shared
@settings(max_examples=100, deadline=None)
@given(which=st.integers(min_value=0), cut=st.integers(min_value=0), junk=st.binary(max_size=6))
def test_byte_mutated_real_messages(which: int, cut: int, junk: bytes) -> None:
    data = REAL_MESSAGES[which % len(REAL_MESSAGES)].read_bytes()
    at = cut % len(data)
    _parse_or_parse_error(data[:at] + junk + data[at + len(junk) :])


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    minutes=st.integers(-14 * 60, 14 * 60),
)
def test_hl7_timestamp_round_trip_through_any_offset(moment: datetime, minutes: int) -> None:
    aware = moment.replace(microsecond=0, tzinfo=timezone(timedelta(minutes=minutes)))
    sign = "-" if minutes < 0 else "+"
    stamp = (
        aware.strftime("%Y%m%d%H%M%S").rjust(14, "0")
        + f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    )
    text = message(PID, f"OBX|1|NM|8867-4^HR^LN||72|/min|||||F|||{stamp}")
    assert parse_message(text).records[0].observations[0].effective == aware.astimezone(UTC)
