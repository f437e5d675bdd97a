"""The flavor configuration: file syntax, defaults, CLI flags, precise errors, status text."""
import errno

import pytest

from bpfilter_umh import config as C
from bpfilter_umh.errors import BpfilterError


def test_default_is_nf_everywhere(tmp_path):
    cfg = C.load(str(tmp_path / "missing.conf"))
    assert cfg.flavor("ipv4") == cfg.flavor(10) == "nf"


def test_file_family_and_chain_settings(tmp_path):
    p = tmp_path / "f.conf"
    p.write_text("# comment\nipv4 = xdp mode=generic\nipv6 = nf\n")
    cfg = C.load(str(p))
    assert cfg.flavor(2) == "xdp" and cfg.xdp_mode("ipv4") == "generic"
    cfg = C.parse("ipv4 INPUT = tc\nipv4 OUTPUT = tc\n")     # FORWARD: the family's (nf)
    assert cfg.flavor("ipv4") == "INPUT=tc,FORWARD=nf,OUTPUT=tc"
    cfg = C.parse("ipv4 = xdp\nipv4 OUTPUT = nf\n")
    assert cfg.flavor("ipv4") == "INPUT=xdp,FORWARD=xdp,OUTPUT=nf"
    assert C.parse_spec(cfg.flavor("ipv4")) == cfg.chain_flavors("ipv4")
    assert C.parse("ipv4 INPUT = tc\nipv4 = tc\n").flavor("ipv4") == "tc"


@pytest.mark.parametrize("text,err,msg", [
    ("ipv4 = ebpf", errno.EINVAL, r"<text>:1: unknown flavor 'ebpf'"),
    ("ipv4 OUTPUT = xdp", errno.EINVAL, "flavor xdp cannot serve OUTPUT"),
    ("ipv4 INPUT = tc offload=eth0", errno.EINVAL, "unknown option"),
    ("ipv4 = xdp offload=eth0\nipv4 INPUT = nf", errno.EINVAL, "offload needs INPUT on xdp"),
    ("ipv6 = xdp offload=eth0", errno.EOPNOTSUPP, "ipv4 only"),
    ("ipv4 PREROUTING = tc", errno.EINVAL, "unknown chain"),
    ("ipv4 tc", errno.EINVAL, "expected 'FAMILY"),
    ("ipv4 = tc mode=native", errno.EINVAL, "unknown option"),
])
def test_bad_config_is_a_precise_error(text, err, msg):
    with pytest.raises(BpfilterError, match=msg) as ei:
        C.parse(text)
    assert ei.value.errno == err


def test_flags_override_file_and_are_checked():
    cfg, rest = C.apply_flags(C.parse("ipv4 = tc"), ["--flavor", "xdp", "--offload", "eth0",
                                                     "status"])
    assert cfg.flavor("ipv4") == "xdp" and cfg.offload["ipv4"] == "eth0" and rest == ["status"]
    with pytest.raises(BpfilterError, match="--offload needs --flavor xdp"):
        C.apply_flags(C.Config(), ["--offload", "eth0"])
    with pytest.raises(BpfilterError, match="needs a value"):
        C.apply_flags(C.Config(), ["--flavor"])


def test_status_text():
    st = dict(table="filter", family="ipv4", flavor="tc", chains=[
        dict(name="INPUT", hook="INPUT", flavor="tc", prog_id=7, jited_size=300, rule_count=2,
             link=dict(flavor="tc", interfaces={"eth0": ["egress", "ingress"]})),
        dict(name="web", hook=None, rule_count=1)])
    text = C.status_text(st)
    assert "ipv4 filter: flavor tc" in text and "eth0(egress/ingress)" in text
    assert "web" not in text
