"""HL7 v2 acknowledgements: MSA codes, ERR locations, escaping, and a size that one recv reads."""

from __future__ import annotations

from fibemrss.domain.errors import FieldProblem
from services.emr_gateway.core.answers import hl7_ack
from services.emr_gateway.core.ingestion import Outcome

MSG = b"\xef\xbb\xbfMSH|^~\\&|LAB|NORTH|FIB|H|20240101||ORU^R01^ORU_R01|CTRL-7|P|2.5.1\nPID|1||x\n"


def segments(ack: bytes) -> list[list[str]]:
    return [s.split("|") for s in ack.decode().split("\r") if s]


def test_header_is_read_and_echoed() -> None:
    header = hl7_ack.read_header(MSG)
    assert (header.control_id, header.trigger_event, header.version) == ("CTRL-7", "R01", "2.5.1")
    msh, msa = segments(hl7_ack.encode_ack(header, hl7_ack.ack_for_outcomes([]), "A1", "h"))
    assert msh[4:6] == ["LAB", "NORTH"] and msh[8] == "ACK^R01^ACK" and msh[9] == "A1"
    assert msa[:3] == ["MSA", "AA", "CTRL-7"]


def test_the_header_is_read_from_the_first_segment_whatever_frames_it() -> None:
    """Framing bytes, a byte-order mark and blanks around the message are not part of MSH, in
    front of it and after it when MSH is its only segment; what follows the first segment (here
    bytes that are no text at all) is never read."""
    header = hl7_ack.read_header(MSG)
    only_msh = MSG.removeprefix(b"\xef\xbb\xbf").split(b"\n", 1)[0]
    for framed in (
        b"\x0b" + MSG + b"\x1c\r",
        b"\r\n\t " + only_msh + b" \t\x1c\r",
        only_msh + b"\n" + bytes(range(256)) * 4096,
    ):
        assert hl7_ack.read_header(framed) == header
    assert hl7_ack.read_header(b"\x0b\x1c\r") == hl7_ack.MessageHeader()


def test_fates_map_to_msa_codes() -> None:
    def code(*fates: str) -> str:
        return hl7_ack.ack_for_outcomes([Outcome(i, "s", f, ["r"]) for i, f in enumerate(fates)]).code  # type: ignore[arg-type]

    assert code("accepted", "duplicate") == "AA"
    assert code("accepted", "quarantined") == "AE"
    assert code("rejected") == "AE"
    assert code("unsupported") == "AR"
    assert hl7_ack.ack_for_problems([FieldProblem("MSH-10", "message control id missing")]).code == "AR"
    assert hl7_ack.ack_for_problems([FieldProblem("OBX[2]-5", "is not a number")]).code == "AE"


def test_locations_and_escaping() -> None:
    assert hl7_ack.location("OBX[3]-5[2]") == "OBX^3^5^2"
    assert hl7_ack.location("MSH-10") == "MSH^1^10"
    assert hl7_ack.location("PID[1]") == "PID^1"
    assert hl7_ack.location("message") == ""
    assert hl7_ack.escape("a|b^c~d\\e&f\rg") == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f g"


def test_a_long_error_list_stays_readable_in_one_4k_read() -> None:
    problems = [FieldProblem(f"OBX[{i}]-5", "is not a number " + "x" * 100) for i in range(1, 200)]
    raw = hl7_ack.encode_ack(hl7_ack.read_header(MSG), hl7_ack.ack_for_problems(problems), "A", "h")
    assert len(raw) < 4096
    last = segments(raw)[-1]
    assert last[0] == "ERR" and last[-1].endswith("more problems not listed")
