"""The heatmap: a PNG with one cell per VM pair, and a clear message without matplotlib."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.paths import PAGE_SIZE
from ksmpolicy.report.plot import INSTALL_HINT, heatmap
from ksmpolicy.report.sharing import PairShare, Sharing, VmShare


def vm(name: str, group: str | None, pid: int) -> VmShare:
    return VmShare(name, pid, group, "default", "qemu", 0, 0, 0, 0, 0, 0)


SHARING = Sharing(
    vms=(vm("web-2", "web", 2), vm("db-1", None, 3), vm("web-1", "web", 1)),
    pairs=(PairShare("web-1", "web-2", 2**24 // PAGE_SIZE, 0, 1, 2),),
    group_pairs=(),
    pages_sharing=2**24 // PAGE_SIZE,
    ksm_zero_pages=0,
    findings=(),
    seconds=0.0,
)


def test_heatmap_draws_the_pairs_ordered_by_group(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the dev extra installs matplotlib")
    from matplotlib.image import imread

    out = tmp_path / "map.png"
    heatmap(SHARING, out)
    pixels = imread(out)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_to_draw_is_said(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the dev extra installs matplotlib")
    empty = Sharing((), (), (), 0, 0, (), 0.0)
    with pytest.raises(KsmPolicyError, match="nothing to draw"):
        heatmap(empty, tmp_path / "x.png")


def test_without_matplotlib_the_message_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(KsmPolicyError) as caught:
        heatmap(SHARING, tmp_path / "x.png")
    assert str(caught.value) == INSTALL_HINT
    assert not (tmp_path / "x.png").exists()


def test_a_planted_symlink_is_replaced_never_followed(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the dev extra installs matplotlib")
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    out = tmp_path / "map.png"
    out.symlink_to(victim)  # planted where the user asked for the picture
    heatmap(SHARING, out)
    assert victim.read_text() == "root's file\n"
    assert not out.is_symlink()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png", "victim"]  # no leftovers


def test_two_vms_with_one_name_are_two_rows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the dev extra installs matplotlib")
    twins = (vm("web", "web", 1), vm("web", "web", 2))
    pages = 2**24 // PAGE_SIZE
    shared = Sharing(twins, (PairShare("web", "web", pages, 0, 1, 2),), (), pages, 0, (), 0.0)
    apart = Sharing(twins, (), (), 0, 0, (), 0.0)
    heatmap(shared, tmp_path / "shared.png")
    heatmap(apart, tmp_path / "apart.png")
    assert (tmp_path / "shared.png").read_bytes() != (tmp_path / "apart.png").read_bytes()
