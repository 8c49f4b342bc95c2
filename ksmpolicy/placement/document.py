"""A host's sketch as it travels between hosts: JSON sealed under the fleet key (`to_json`),
read back from a file or a daemon's /sketch with its seal and every field checked (`read_sketch`,
`from_json`). A sketch is input from another host: nothing of it is used before its seal
matches, and its names, UUIDs and VMIDs must be what they claim before `rebalance` prints them."""

from __future__ import annotations

import base64
import hmac
import http.client
import json
import math
import time
import urllib.request

import numpy as np

from ksmpolicy.files import read_regular
from ksmpolicy.paths import FLEET_KEY
from ksmpolicy.placement.sketch import (
    FORMAT,
    MAX_BYTES,
    MAX_K,
    MAX_NAME,
    MAX_PAGES,
    MAX_SKETCH_BYTES,
    PLATFORMS,
    UUID,
    VMID,
    FleetKey,
    HostSketch,
    SketchError,
    VmSketch,
    is_host_name,
)
from ksmpolicy.policy.model import NAME


def to_json(sketch: HostSketch, key: FleetKey) -> dict[str, object]:
    """The host's sketch as JSON, sealed under the fleet key."""
    document: dict[str, object] = {
        "format": FORMAT,
        "host": sketch.host,
        "key_id": sketch.key_id,
        "k": sketch.k,
        "use_zero_pages": sketch.use_zero_pages,
        "max_page_sharing": sketch.max_page_sharing,
        "mem_total_bytes": sketch.mem_total_bytes,
        "mem_available_bytes": sketch.mem_available_bytes,
        "taken_at": round(sketch.taken_at, 3),
        "active_domains": (None if sketch.active_domains is None else list(sketch.active_domains)),
        "vms": [_vm_json(vm) for vm in sketch.vms],
    }
    document["seal"] = key.seal(document)
    return document


def _vm_json(vm: VmSketch) -> dict[str, object]:
    repeated = np.flatnonzero(vm.counts > 1)
    return {
        "name": vm.name,
        "uuid": vm.uuid,
        "vmid": vm.vmid,
        "platform": vm.platform,
        "domain": vm.domain,
        "group": vm.group,
        "merges": vm.merges,
        "active": vm.active,
        "ram_bytes": vm.ram_bytes,
        "present_pages": vm.present_pages,
        "zero_pages": vm.zero_pages,
        "volatile_pages": vm.volatile_pages,
        "values": base64.b64encode(vm.values.astype("<u8").tobytes()).decode("ascii"),
        # [index, count] of the values more than one of its pages hold
        "repeats": [[int(i), int(vm.counts[i])] for i in repeated],
        # indices of the values kept because it holds them K times or more
        "exact": [int(i) for i in np.flatnonzero(vm.exact)],
    }


def from_json(data: object, source: str, key: FleetKey) -> HostSketch:
    """A host sketch from its JSON: its seal checked under `key` before anything else, then
    every field; SketchError names `source` and the key."""
    where = _Where(source)
    top = where.mapping(data, "")
    if top.get("format") != FORMAT:
        raise SketchError(
            f"{source}: not a ksmpolicy sketch of this version (format {top.get('format')!r}, "
            f"expected {FORMAT!r}): sketch the host again with this version"
        )
    key_id = where.text(top, "key_id")
    if key_id != key.key_id:
        raise SketchError(
            f"{source}: sketched under another fleet key ({key_id}, not this host's "
            f"{key.key_id}): give every host the same {FLEET_KEY}"
        )
    seal = top.get("seal")
    if not isinstance(seal, str) or not hmac.compare_digest(seal, key.seal(top)):
        raise SketchError(
            f"{source}: its seal does not match its contents under the fleet key: it was "
            "changed after it was taken, or not taken by a host of this fleet; refusing it"
        )
    active = top.get("active_domains")
    if active is not None:
        listed = enumerate(where.list(top, "active_domains"))
        active = tuple(where.name(name, "", f"active_domains.{n}") for n, name in listed)
    total = where.integer(top, "mem_total_bytes", 0, MAX_BYTES)
    available = where.integer(top, "mem_available_bytes", 0, total)
    host = where.text(top, "host")
    if not is_host_name(host):
        raise SketchError(f"{source}: host: {host!r} is no host name or IP address")
    vms = [_vm_from(where, vm, f"vms.{i}") for i, vm in enumerate(where.list(top, "vms"))]
    return HostSketch(
        host=host,
        key_id=key_id,
        k=where.integer(top, "k", 1, MAX_K),
        use_zero_pages=where.flag(top, "use_zero_pages"),
        max_page_sharing=where.integer(top, "max_page_sharing", 2, 2**31),
        mem_total_bytes=total,
        mem_available_bytes=available,
        taken_at=float(where.integer(top, "taken_at", 0, MAX_PAGES, number=True)),
        active_domains=active,
        vms=tuple(vms),
        source=source,
    )


def _vm_from(where: _Where, data: object, at: str) -> VmSketch:
    vm = where.mapping(data, at)
    try:
        raw = base64.b64decode(where.text(vm, "values", at), validate=True)
    except ValueError as exc:
        raise SketchError(f"{where.source}: {at}.values: not base64") from exc
    if len(raw) % 8:
        raise SketchError(f"{where.source}: {at}.values: not a whole number of 8-byte values")
    values = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    if values.size > 1 and not bool(np.all(values[1:] > values[:-1])):
        raise SketchError(f"{where.source}: {at}.values: not sorted and unique")
    present = where.integer(vm, "present_pages", 0, MAX_PAGES, at)
    counts = np.ones(values.size, dtype=np.uint32)
    for n, pair in enumerate(where.list(vm, "repeats", at)):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
            or not 0 <= pair[0] < values.size
            or not 2 <= pair[1] < 2**32
        ):
            raise SketchError(
                f"{where.source}: {at}.repeats.{n}: expected [index, count] with count >= 2"
            )
        counts[pair[0]] = pair[1]
    exact = np.zeros(values.size, dtype=bool)
    for n, index in enumerate(where.list(vm, "exact", at)):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < values.size:
            raise SketchError(f"{where.source}: {at}.exact.{n}: expected an index of values")
        exact[index] = True
    zero = where.integer(vm, "zero_pages", 0, present, at)
    if int(counts.sum(dtype=np.int64)) + zero > present:
        raise SketchError(
            f"{where.source}: {at}: its sampled and zero pages are more than its present_pages"
        )
    ram = vm.get("ram_bytes")
    name, uuid, vmid, platform = _identity(where, vm, at)
    return VmSketch(
        name=name,
        uuid=uuid,
        vmid=vmid,
        platform=platform,
        domain=where.name(vm.get("domain"), at, "domain"),
        group=None if vm.get("group") is None else where.name(vm.get("group"), at, "group"),
        merges=where.flag(vm, "merges", at),
        active=where.flag(vm, "active", at),
        ram_bytes=None if ram is None else where.integer(vm, "ram_bytes", 0, MAX_BYTES, at),
        present_pages=present,
        zero_pages=zero,
        volatile_pages=where.integer(vm, "volatile_pages", 0, MAX_PAGES, at),
        values=values,
        counts=counts,
        exact=exact,
    )


def _identity(
    where: _Where, vm: dict[str, object], at: str
) -> tuple[str, str | None, str | None, str]:
    """A VM's name, UUID, VMID and platform (the UUID and VMID name it in printed commands)."""
    uuid = where.optional_text(vm, "uuid", at)
    if uuid is not None and not UUID.fullmatch(uuid):
        raise SketchError(f"{where.source}: {at}.uuid: expected a UUID in lowercase hex")
    vmid = where.optional_text(vm, "vmid", at)
    if vmid is not None and not VMID.fullmatch(vmid):
        raise SketchError(f"{where.source}: {at}.vmid: expected a VMID (digits)")
    platform = where.text(vm, "platform", at)
    if platform not in PLATFORMS:
        raise SketchError(f"{where.source}: {at}.platform: expected one of {', '.join(PLATFORMS)}")
    # A name is its owner's choice (libvirt takes newlines and escapes): any text, so that a
    # tenant's name cannot make its host's whole sketch unreadable. It names nothing in a
    # command, and every output escapes it (quoting.printable, quote; JSON).
    name = vm.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise SketchError(f"{where.source}: {at}.name: expected text of 1 to {MAX_NAME} characters")
    return name, uuid, vmid, platform


class _Where:
    """Typed field access that names the file and the key in its errors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def _fail(self, at: str, key: str, want: str) -> SketchError:
        place = f"{at}.{key}" if at else key
        return SketchError(f"{self.source}: {place}: expected {want}")

    def mapping(self, data: object, at: str) -> dict[str, object]:
        if not isinstance(data, dict):
            raise SketchError(f"{self.source}: {at or 'the document'}: expected a mapping")
        return data

    def list(self, data: dict[str, object], key: str, at: str = "") -> list[object]:
        value = data.get(key)
        if not isinstance(value, list):
            raise self._fail(at, key, "a list")
        return value

    def text(self, data: dict[str, object], key: str, at: str = "") -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value.isprintable():
            raise self._fail(at, key, "printable text")
        return value

    def optional_text(self, data: dict[str, object], key: str, at: str = "") -> str | None:
        return None if data.get(key) is None else self.text(data, key, at)

    def name(self, value: object, at: str, key: str) -> str:
        """A domain or group name (`value`, found at `key`)."""
        if not isinstance(value, str) or not NAME.fullmatch(value):
            raise self._fail(at, key, "a domain or group name")
        return value

    def flag(self, data: dict[str, object], key: str, at: str = "") -> bool:
        value = data.get(key)
        if not isinstance(value, bool):
            raise self._fail(at, key, "true or false")
        return value

    def integer(
        self,
        data: dict[str, object],
        key: str,
        least: int,
        most: int,
        at: str = "",
        *,
        number: bool = False,
    ) -> int:
        value = data.get(key)
        if isinstance(value, float) and number and math.isfinite(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
            raise self._fail(at, key, f"a number from {least} to {most}")
        return value


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A sketch URL is fetched where it was given: a redirect is an error, not followed."""

    def redirect_request(self, *_args: object, **_kwargs: object) -> None:
        return None


def read_sketch(where: str, key: FleetKey, *, timeout: float = 10.0) -> HostSketch:
    """A host's sketch from a file or an http(s) URL (a daemon's /sketch), its seal checked
    under `key`. A URL is fetched directly (no proxy, no redirect), in `timeout` seconds."""
    if where.startswith(("http://", "https://")):
        data = _fetch(where, timeout)
    else:
        try:
            data = read_regular(where, MAX_SKETCH_BYTES + 1)
        except OSError as exc:
            raise SketchError(f"cannot read {where}: {exc.strerror or exc}") from exc
    if len(data) > MAX_SKETCH_BYTES:
        raise SketchError(f"{where}: larger than {MAX_SKETCH_BYTES // 2**20} MiB: refusing it")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise SketchError(f"{where}: not JSON ({str(exc) or 'nested too deeply'})") from exc
    return from_json(document, where, key)


def _fetch(url: str, timeout: float) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    deadline = time.monotonic() + timeout
    data = bytearray()
    try:
        with opener.open(url, timeout=timeout) as response:
            while len(data) <= MAX_SKETCH_BYTES:
                if time.monotonic() > deadline:
                    raise SketchError(f"{url}: not received within {timeout:g} s")
                chunk = response.read(2**20)
                if not chunk:
                    break
                data += chunk
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise SketchError(f"cannot fetch {url}: {exc}") from exc
    return bytes(data)
