"""The TUN/TAP ioctl numbers and ifreq layout against the kernel's (linux/if_tun.h)."""

from __future__ import annotations

import pytest

from pyvduse.abi import tun


def test_ioctl_numbers_match_the_kernel() -> None:
    # _IOW('T', nr, int) / _IOR('T', nr, unsigned int) from linux/if_tun.h on x86-64
    assert tun.TUNSETIFF == 0x400454CA
    assert tun.TUNSETPERSIST == 0x400454CB
    assert tun.TUNGETFEATURES == 0x800454CF
    assert tun.TUNSETOFFLOAD == 0x400454D0
    assert tun.TUNGETIFF == 0x800454D2
    assert tun.TUNSETVNETHDRSZ == 0x400454D8
    assert tun.TUNSETCARRIER == 0x400454E2
    assert (tun.SIOCGIFFLAGS, tun.SIOCSIFFLAGS, tun.SIOCSIFMTU) == (0x8913, 0x8914, 0x8922)


def test_ifreq() -> None:
    raw = tun.ifreq_flags("tap0", tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR)
    assert len(raw) == 40 and raw[:5] == b"tap0\0" and raw[16:18] == b"\x02\x50"
    assert tun.ifreq_unpack(tun.ifreq_int("tap0", 9000)) == ("tap0", 9000)
    for bad in ("", "a" * 16, "a/b", "a:b", "a b"):
        with pytest.raises(ValueError):
            tun.encode_ifname(bad)
