"""Build an image from a recipe (``Sandboxfile`` or ``Dockerfile``): one layer per
filesystem-changing instruction, with a build cache.

``FROM debian:SUITE`` bootstraps Debian rootless with mmdebstrap (``--variant=`` and
``--include=`` flags pass through); ``FROM scratch`` starts empty; any other FROM names an
image in the store (a shipped recipe of that name is built first). RUN executes inside a
sandbox over the layers so far, with the overlay upper kept on disk; that upper becomes the
new layer. RUN has no network unless the build allows it (``network="host"``: the step
shares the host's network namespace and sees its /etc/resolv.conf); ``RUN --network=none``
opts a step out, ``RUN --network=host`` in a build without it is an error. RUN runs as the
recipe's USER. COPY/ADD take files from the build context (never following a symlink out
of it); ADD extracts a local tar with the layer unpacker's checks.

Cache: a step whose parent layers, text (after ARG/ENV substitution), environment, working
dir, user and, for COPY/ADD, input content hashes are unchanged reuses the layer it made
before (``build-cache/KEY`` in the store); ``no_cache`` rebuilds every step. Each step
reports ``Step N/M : INSTRUCTION`` then `` ---> CACHED`` or the time it took.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .. import config
from ..errors import ImageError, SpecError
from ..spec import JobSpec, Status
from . import layers, recipe, users
from .ignore import Ignore
from .recipe import Instruction, RecipeError
from .store import Image, Layer, Store, normalize_ref

if TYPE_CHECKING:
    from ..supervisor.core import Supervisor

Progress = Callable[[str], None]
RECIPE_NAMES = ("Sandboxfile", "Dockerfile")
NETWORKS = ("none", "host")
TRIM_DPKG = [
    "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*", "path-exclude=/usr/share/linda/*",
]
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")


def shipped_recipe(ref: str) -> Path | None:
    """The shipped recipe dir (``images/NAME``) for ``NAME`` or ``NAME:latest``."""
    name = normalize_ref(ref)
    if not name.endswith(":latest") or "/" in name:
        return None
    directory = config.recipes_dir() / name.removesuffix(":latest")
    return directory if find_recipe_file(directory) else None


def find_recipe_file(directory: Path) -> Path | None:
    for name in RECIPE_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


@dataclass
class _State:
    store: Store
    network: str = "none"
    layers: list[Layer] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)
    base_config: dict[str, Any] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.runtime.get("Env", []):
            key, _, value = item.partition("=")
            out[key] = value
        return out

    def set_env(self, values: dict[str, str]) -> None:
        env = self.env()
        env.update(values)
        self.runtime["Env"] = [f"{k}={v}" for k, v in env.items()]

    def chain(self) -> str:
        return ",".join(layer.diff_id for layer in self.layers)

    def image(self) -> Image:
        cfg = {"config": self.runtime,
               "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in self.layers]}}
        return Image(ref="<build>", manifest_digest="", config_digest="", config=cfg,
                     layers=tuple(self.layers), store_root=self.store.root)


class _Cache:
    """``build-cache/KEY`` -> the layer an instruction produced on top of a parent."""

    def __init__(self, store: Store, enabled: bool) -> None:
        self.dir = store.root / "build-cache"
        self.store = store
        self.enabled = enabled

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def get(self, key: str) -> Layer | None:
        if not self.enabled:
            return None
        try:
            data = json.loads((self.dir / key).read_text())
            layer = Layer(data["digest"], data["diff_id"], int(data["size"]),
                          data.get("media_type", "application/vnd.oci.image.layer.v1.tar"))
        except (OSError, ValueError, KeyError):
            return None
        if not self.store.has_blob(layer.digest):
            return None
        self.store.unpack_layer(layer.digest, layer.diff_id)
        return layer

    def put(self, key: str, layer: Layer) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"  # concurrent builds each write their own
        tmp.write_text(json.dumps({"digest": layer.digest, "diff_id": layer.diff_id,
                                   "size": layer.size, "media_type": layer.media_type}))
        os.replace(tmp, self.dir / key)


def _inputs(path: Path, context: Path, ignore: Ignore) -> list[Path]:
    """``path`` and, for a directory, everything below it that the ignore file keeps."""
    if not path.is_dir() or path.is_symlink():
        return [path]
    return [path, *(sub for sub in sorted(path.rglob("*"))
                    if not ignore.ignored(str(sub.relative_to(context))))]


def _files_digest(paths: list[Path], root: Path, ignore: Ignore) -> str:
    """Content hash of the inputs of a COPY/ADD (names, modes, contents, link targets)."""
    h = hashlib.sha256()
    for path in paths:
        for sub in _inputs(path, root, ignore):
            st = sub.lstat()
            h.update(f"{sub.relative_to(root)}\0{st.st_mode:o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(sub).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(hashlib.sha256(sub.read_bytes()).digest())
    return h.hexdigest()


def _context_path(context: Path, rel: str, ins: Instruction, path: str) -> Path:
    candidate = (context / rel.lstrip("/")).absolute()
    real = Path(os.path.realpath(candidate))
    if real != context and context not in real.parents:
        raise RecipeError(path, ins.line, f"{rel!r} is outside the build context")
    if not candidate.exists():
        raise RecipeError(path, ins.line, f"{rel!r} does not exist in the build context")
    return real


def _sources(context: Path, words: list[str], ignore: Ignore, ins: Instruction,
             path: str) -> list[Path]:
    """COPY/ADD sources in the context: wildcards (``*``, ``?``, ``[...]``) expanded as
    Docker does, what the ignore file leaves out treated as absent."""
    out: list[Path] = []
    for word in words:
        if any(c in word for c in "*?["):
            found = sorted(p for p in context.glob(word.lstrip("/"))
                           if not ignore.ignored(str(p.relative_to(context))))
            if not found:
                raise RecipeError(path, ins.line, f"{word!r}: no file in the build context "
                                  "matches")
            out += [_context_path(context, str(p.relative_to(context)), ins, path)
                    for p in found]
            continue
        if ignore.ignored(word):
            raise RecipeError(path, ins.line, f"{word!r} is excluded by the build context's "
                              "ignore file")
        out.append(_context_path(context, word, ins, path))
    return out


def bootstrap_command(suite: str, flags: dict[str, str], out: str) -> list[str]:
    """The mmdebstrap command (rootless unless we are root) that writes a rootfs tar of
    ``debian:SUITE`` to ``out``; the build cache keys the layer on it."""
    variant = flags.get("variant", "minbase")
    mode = "root" if os.geteuid() == 0 else "unshare"
    cmd = ["mmdebstrap", f"--mode={mode}", f"--variant={variant}", "--format=tar"]
    if include := flags.get("include"):
        cmd.append(f"--include={include}")
    if components := flags.get("components"):
        cmd.append(f"--components={components}")
    # mmdebstrap copies the host's resolv.conf and hostname in: keep them out of the image
    # (at the end, as apt may run inside the chroot; extract runs no customize hooks)
    hook = "--setup-hook" if variant == "extract" else "--customize-hook"
    cmd.append(f'{hook}=rm -f "$1/etc/resolv.conf"; echo localhost > "$1/etc/hostname"')
    if variant != "extract":
        if MERGED_USR_HOOKS.is_dir():
            cmd.append(f"--hook-dir={MERGED_USR_HOOKS}")
        cmd += [f"--dpkgopt={opt}" for opt in TRIM_DPKG]
    cmd += [suite, out]
    if mirror := flags.get("mirror"):
        cmd.append(mirror)
    return cmd


def _bootstrap(cmd: list[str], log: Progress) -> None:
    """Run a `bootstrap_command`."""
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap is not installed (apt install mmdebstrap); it builds "
                         "debian:SUITE images")
    mode = cmd[1].removeprefix("--mode=")
    log(f" ---> {' '.join(cmd)}")
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "TMPDIR": "/tmp",
           "LANG": "C.UTF-8", "HOME": str(Path.home())}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    tail: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        line = line.rstrip()
        tail = [*tail[-19:], line]
        log(line)
    if proc.wait() != 0:
        hint = ""
        if mode == "unshare":
            hint = " (rootless mmdebstrap needs a /etc/subuid range and newuidmap)"
        last = next((x for x in reversed(tail) if x.startswith("E:")), tail[-1] if tail else "")
        raise ImageError(f"mmdebstrap failed{hint}: {last}")


async def build(sup: Supervisor, context: Path, ref: str, *, progress: Progress | None = None,
                no_cache: bool = False, recipe_file: Path | None = None,
                build_args: dict[str, str] | None = None, network: str = "none") -> Image:
    """Build the recipe in ``context`` and tag the result ``ref``. ``network`` is ``none``
    (RUN steps get a loopback of their own) or ``host`` (they share the host's)."""
    if network not in NETWORKS:
        raise ImageError(f"--network {network}: expected one of {', '.join(NETWORKS)}")
    normalize_ref(ref)  # a bad name fails now, not after the last step
    log = progress or (lambda _line: None)
    context = Path(await trio.Path(context).absolute())
    recipe_file = recipe_file or find_recipe_file(context)
    if recipe_file is None:
        raise ImageError(f"no Sandboxfile or Dockerfile in {context}")
    path = str(recipe_file)
    instructions = recipe.parse(await trio.Path(recipe_file).read_text(), path)
    store = sup.store
    store.init()
    state = _State(store, network)
    state.args.update(build_args or {})
    cache = _Cache(store, not no_cache)
    total = len(instructions)
    with store.writing():  # prune waits: the new layers are not tagged yet
        for number, ins in enumerate(instructions, 1):
            log(f"Step {number}/{total} : {ins.source}")
            started = time.monotonic()
            cached = await _step(sup, state, cache, ins, context, path, log)
            log(" ---> CACHED" if cached
                else f" ---> done in {time.monotonic() - started:.1f}s")
        cfg = {**state.base_config, "config": state.runtime, "history": state.history,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        cfg.pop("rootfs", None)
        image = store.commit(ref, state.layers, cfg)
    log(f"Successfully built {image.id[7:19]} as {image.ref}")
    return image


def _history(state: _State, ins: Instruction, empty: bool) -> None:
    state.history.append({"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "created_by": ins.source, "empty_layer": empty})


async def _step(sup: Supervisor, state: _State, cache: _Cache, ins: Instruction,
                context: Path, path: str, log: Progress) -> bool:
    """Apply one instruction; returns True when its layer came from the cache."""
    text = recipe.substitute(ins.text, {**state.args, **state.env()})
    match ins.keyword:
        case "ARG":
            name, sep, default = text.partition("=")
            state.args.setdefault(name.strip(), default if sep else "")
            return False
        case "FROM":
            return await _from(sup, state, cache, ins, text, path, log)
        case "ENV":
            state.set_env(recipe.parse_key_values(text, path, ins.line, "ENV"))
        case "LABEL":
            state.runtime.setdefault("Labels", {}).update(
                recipe.parse_key_values(text, path, ins.line, "LABEL"))
        case "WORKDIR":
            current = state.runtime.get("WorkingDir") or "/"
            state.runtime["WorkingDir"] = posixpath.normpath(posixpath.join(current, text))
        case "USER":
            state.runtime["User"] = text
        case "ENTRYPOINT" | "CMD":
            argv = ins.exec_form if ins.exec_form is not None else (
                ["/bin/sh", "-c", text] if text else [])
            state.runtime["Entrypoint" if ins.keyword == "ENTRYPOINT" else "Cmd"] = argv
        case "RUN":
            return await _run(sup, state, cache, ins, text, path, log)
        case "COPY" | "ADD":
            return await _copy(state, cache, ins, text, context, path)
        case _:  # pragma: no cover - the parser refuses anything else
            raise RecipeError(path, ins.line, f"unsupported instruction {ins.keyword}")
    _history(state, ins, empty=True)
    return False


async def _from(sup: Supervisor, state: _State, cache: _Cache, ins: Instruction, text: str,
                path: str, log: Progress) -> bool:
    if state.layers or state.history:
        raise RecipeError(path, ins.line, "only one FROM is supported (no multi-stage builds)")
    words = text.split()
    if len(words) != 1:
        raise RecipeError(path, ins.line, "FROM takes one image name (FROM ... AS ... "
                          "is a multi-stage build, which is not supported)")
    name = words[0]
    bootstrap = name.startswith("debian:") and sup.store.find(name) is None
    if ins.flags and not bootstrap:
        raise RecipeError(path, ins.line, f"FROM --{next(iter(ins.flags))} only applies to "
                          "debian:SUITE (bootstrapped with mmdebstrap)")
    if name == "scratch":
        return False
    if bootstrap:
        suite = name.split(":", 1)[1]
        key = cache.key("FROM", *bootstrap_command(suite, ins.flags, "-"))
        if (layer := cache.get(key)) is not None:
            state.layers.append(layer)
            _history(state, ins, empty=False)
            return True
        with sup.store.tempdir() as tmp:
            out = Path(tmp) / "rootfs.tar"
            cmd = bootstrap_command(suite, ins.flags, str(out))
            await trio.to_thread.run_sync(_bootstrap, cmd, log)
            layer = await trio.to_thread.run_sync(sup.store.import_layer_tar, out)
        cache.put(key, layer)
        state.layers.append(layer)
        _history(state, ins, empty=False)
        return False
    try:
        base = await sup.image(name)
    except (ImageError, SpecError) as e:
        raise RecipeError(path, ins.line, str(e)) from None
    state.layers = list(base.layers)
    state.runtime = dict(base.runtime)
    state.history = list(base.config.get("history") or [])
    return False


def _step_network(state: _State, ins: Instruction, path: str) -> bool:
    """Whether this RUN shares the host's network."""
    wanted = ins.flags.get("network", "default")
    if wanted == "host" and state.network != "host":
        raise RecipeError(path, ins.line, "RUN --network=host needs the build to allow it "
                          "(sandbox build --network host)")
    return state.network == "host" and wanted != "none"


def _user_ids(state: _State, ins: Instruction, path: str) -> tuple[int, int] | None:
    """The recipe's USER as (uid, gid), looked up in the image's /etc/passwd and
    /etc/group when given by name; None for root (the build profile's own ids)."""
    user = str(state.runtime.get("User") or "")
    if not user:
        return None
    try:
        uid, gid = users.lookup(state.image().lower_dirs(), user)
    except users.NoSuchUser as e:
        raise RecipeError(path, ins.line, f"USER {user}: {e}") from None
    return None if (uid, gid) == (0, 0) else (uid, gid)


def _resolv_conf_placeholder(lower: list[str]) -> bool | None:
    """For a RUN with the host's network: None when the host's /etc/resolv.conf cannot be
    shown (the image has no /etc dir, or its resolv.conf is not a plain file); else whether
    binding it creates a placeholder file that must not end up in the layer."""
    if not os.path.isfile("/etc/resolv.conf"):
        return None
    etc = layers.merged_lookup(lower, "etc")
    if etc is None or os.path.islink(etc) or not os.path.isdir(etc):
        return None
    found = layers.merged_lookup(lower, "etc/resolv.conf")
    if found is None:
        return True
    return False if os.path.isfile(found) and not os.path.islink(found) else None


def _drop_placeholder(upper: Path) -> None:
    """Remove the empty /etc/resolv.conf a host-network RUN left in its upper dir (and the
    copied-up /etc when nothing else changed there)."""
    placeholder = upper / "etc" / "resolv.conf"
    st = placeholder.lstat() if os.path.lexists(placeholder) else None
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 0:
        placeholder.unlink()
        with contextlib.suppress(OSError):
            (upper / "etc").rmdir()  # only when empty


async def _run(sup: Supervisor, state: _State, cache: _Cache, ins: Instruction, text: str,
               path: str, log: Progress) -> bool:
    argv = ins.exec_form or ["/bin/sh", "-c", text]
    workdir = state.runtime.get("WorkingDir") or "/"
    user = str(state.runtime.get("User") or "")
    key = cache.key("RUN", state.chain(), json.dumps(argv), json.dumps(state.env()), workdir,
                    user)
    host_network = _step_network(state, ins, path)
    if (layer := cache.get(key)) is not None:
        state.layers.append(layer)
        _history(state, ins, empty=False)
        return True
    if not state.layers:
        raise RecipeError(path, ins.line, "RUN needs a base image (FROM scratch has no shell)")
    ids = _user_ids(state, ins, path)
    lower = state.image().lower_dirs()
    placeholder = _resolv_conf_placeholder(lower) if host_network else None

    async def show(stream: str, chunk: bytes) -> None:
        for line in chunk.decode("utf-8", "replace").splitlines():
            log(f"     {line}")

    with sup.store.tempdir() as tmp:
        upper = Path(tmp)
        (upper / "upper").mkdir()
        (upper / "work").mkdir()
        spec = JobSpec(image="<build>", argv=tuple(argv), env=state.env(), profile="build")
        result = await sup.run(spec, show, image=state.image(), writable_root=True,
                               upper_dir=str(upper), workdir=workdir,
                               host_network=host_network, resolv_conf=placeholder is not None,
                               ids=ids)
        if result.status is not Status.OK:
            detail = result.message or (f"exit code {result.exit_code}" if result.exit_code
                                        is not None else f"signal {result.signal}")
            raise RecipeError(path, ins.line, f"RUN failed ({result.status.value}: {detail})")
        if placeholder:
            _drop_placeholder(upper / "upper")
        layer = await trio.to_thread.run_sync(_pack_layer, sup.store, upper / "upper")
    cache.put(key, layer)
    state.layers.append(layer)
    _history(state, ins, empty=False)
    return False


def _pack_layer(store: Store, directory: Path) -> Layer:
    with store.tempdir() as tmp:
        out = Path(tmp) / "layer.tar"
        with open(out, "wb") as f:
            layers.pack(directory, f)
        return store.import_layer_tar(out)


async def _copy(state: _State, cache: _Cache, ins: Instruction, text: str, context: Path,
                path: str) -> bool:
    words = ins.exec_form if ins.exec_form is not None else text.split()
    if len(words) < 2:
        raise RecipeError(path, ins.line, f"{ins.keyword} needs a source and a destination")
    *sources, dest = words
    if ins.keyword == "ADD" and any("://" in src for src in sources):
        raise RecipeError(path, ins.line, "ADD from a URL is not supported (only files of "
                          "the build context)")
    workdir = state.runtime.get("WorkingDir") or "/"
    dest_abs = posixpath.normpath(posixpath.join(workdir, dest))
    ignore = Ignore.of(context)
    srcs = _sources(context, sources, ignore, ins, path)
    # Docker's rules: into the directory when DEST ends with / (or is . or ..), names a
    # directory the image has, or takes several sources; else DEST is the file's new name
    existing = layers.resolve_in_image(state.image().lower_dirs(), dest_abs)
    into_dir = (dest.endswith(("/", "/.", "/..")) or dest in (".", "..") or len(srcs) > 1
                or (existing is not None and existing[1]))
    key = cache.key(ins.keyword, state.chain(), ins.source, dest_abs, str(into_dir),
                    await trio.to_thread.run_sync(_files_digest, srcs, context, ignore))
    if (layer := cache.get(key)) is not None:
        state.layers.append(layer)
        _history(state, ins, empty=False)
        return True
    layer = await trio.to_thread.run_sync(_copy_layer, state.store, ins, srcs, dest_abs,
                                          into_dir, context, ignore)
    cache.put(key, layer)
    state.layers.append(layer)
    _history(state, ins, empty=False)
    return False


def _copy_layer(store: Store, ins: Instruction, srcs: list[Path], dest_abs: str,
                into_dir: bool, context: Path, ignore: Ignore) -> Layer:
    """Stage the sources of a COPY/ADD at their destination and pack that as a layer."""
    mode = int(ins.flags["chmod"], 8) if "chmod" in ins.flags else None

    def skip(directory: str, names: list[str]) -> set[str]:
        base = Path(directory).relative_to(context)
        return {n for n in names if ignore.ignored(str(base / n))}

    with store.tempdir() as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        for src in srcs:
            target = stage / dest_abs.lstrip("/")
            if ins.keyword == "ADD" and src.is_file() and _is_tar(src):
                target.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as f:
                    layers.unpack(f, target, max_bytes=config.max_layer_bytes())
                continue
            if src.is_dir():
                shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True, ignore=skip)
            else:
                if into_dir:
                    target = target / src.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target, follow_symlinks=False)
            if mode is not None:
                for p in [target, *target.rglob("*")] if target.is_dir() else [target]:
                    if not p.is_symlink():
                        p.chmod(mode)
        return _pack_layer(store, stage)


def _is_tar(path: Path) -> bool:
    import tarfile  # noqa: PLC0415

    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False

