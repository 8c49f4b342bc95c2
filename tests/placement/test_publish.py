"""The daemon's /sketch beside /metrics: the same server and address; 503 without saying why
(the log says) while no sketch can be taken, refused keys others can read, then the host's
sketch as JSON, and none again once it can no longer be taken."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ksmpolicy.paths import FLEET_KEY
from ksmpolicy.placement.document import from_json
from ksmpolicy.placement.publish import Published
from ksmpolicy.placement.sketch import SketchError, load_key
from ksmpolicy.report.metrics import StatusCollector, serve
from tests.conftest import free_port
from tests.fakehost import FakeHost


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_sketch_is_served_beside_metrics(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost(tmp_path).meminfo(8_000_000, 4_000_000)
    host.ksm(run=0, use_zero_pages=1, max_page_sharing=256)
    published = Published(host.paths, lambda: None, every=600)
    url = serve(
        StatusCollector(host.paths, lambda: None), str(free_port()), {"/sketch": published.route}
    )
    base = url.removesuffix("/metrics")

    assert fetch(base + "/sketch")[0] == 503  # nothing taken yet
    published.refresh()
    status, text = fetch(base + "/sketch")
    assert status == 503 and text == "no sketch now: the daemon's log says why\n", text
    assert "no sketch at /sketch: no fleet key at" in caplog.text

    key, _made = load_key(host.paths, create=True)
    published.refresh()
    status, text = fetch(base + "/sketch")
    assert status == 200, text
    sketch = from_json(json.loads(text), "/sketch", key)
    assert sketch.vms == () and sketch.mem_available_bytes == 4_000_000 * 1024
    assert sketch.use_zero_pages and sketch.key_id == key.key_id
    status, text = fetch(url)
    assert status == 200 and "ksmpolicy_ksm_available" in text

    host.paths.under_root(FLEET_KEY).unlink()  # the last sketch is not served for a new one
    published.refresh()
    assert fetch(base + "/sketch")[0] == 503


def test_a_key_others_can_read_or_that_is_no_key_is_refused(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    key = host.paths.under_root(FLEET_KEY)
    key.parent.mkdir(parents=True)
    key.write_text("00" * 32 + "\n")
    key.chmod(0o644)
    with pytest.raises(SketchError, match="others may read it"):
        load_key(host.paths)
    key.chmod(0o600)
    key.write_text("not hex\n")
    with pytest.raises(SketchError, match="not a fleet key"):
        load_key(host.paths)
    key.write_text("ab" * 32 + "\n")
    first, made = load_key(host.paths, create=True)  # an existing key is never replaced
    assert not made and first.secret == bytes.fromhex("ab" * 32)
