"""Render one commit's fleet: every host's files as manifest entries plus their contents.

For: reading ``gitops.yaml``, ``vars/*.yaml`` and templates FROM ONE GIT COMMIT (never
the working tree, so an uncommitted edit cannot leak into a signed bundle), rendering
each host's files with Jinja2, hashing static files by streaming them, and returning
a ``Fleet``: one ``applier.manifest.HostEntry`` per host and a content table keyed by
SHA-256 (rendered bytes in a spool file, or a git blob that the writer streams later).

Not for: writing the tar, signing, or the history bundle (the builder does those with
``Fleet.contents`` and ``GitRepo.create_bundle``); parsing rules (``config.py``).

Templates are ``src`` paths ending in ``.j2``; everything else is shipped byte for byte.
Template names in ``{% include %}``/``{% import %}`` are paths from the directory that
holds ``gitops.yaml``. Templates see the host's merged variables plus ``host`` (its
name), ``groups`` (its groups), ``hosts`` (every host name) and ``hostvars`` (every
host's variables), and a ``quote`` filter (POSIX shell quoting). The environment is
sandboxed and immutable: a template cannot change data another host sees, so the
result does not depend on render order or on ``jobs``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import math
import multiprocessing
import operator
import os
import pickle
import posixpath
import shlex
import signal
import tempfile
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from applier import _fs
from applier.config import PROTECTED, within
from applier.errors import ManifestError
from applier.manifest import Command, FileEntry, HostEntry, check_target_path
from bundler.config import (
    CONFIG_NAME,
    VARS_DIR,
    FileSpec,
    RepoConfig,
    group_vars_path,
    host_vars_path,
    parse_vars_file,
)
from bundler.errors import (
    MissingSourceError,
    OutputError,
    RepoConfigError,
    RepoError,
    TemplateRenderError,
)
from bundler.git import DEFAULT_CHUNK, BlobReader, GitRepo, TreeEntry, normalise_subpath

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
# Where a renderer put bytes it rendered: (its spool file, offset, size).
_Spooled = tuple[str, int, int]

# Below this many hosts a process pool costs more (start-up, pickling) than it saves.
PARALLEL_THRESHOLD = 16
_CHUNKS_PER_JOB = 4


# -- what the renderer hands to the writer -------------------------------------------------


class Spool:
    """A file of rendered bytes, open for reading; its name is already gone, so it
    vanishes with its last reader (closed when no content refers to it)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self._fd)

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        while len(data) < size:  # pread may return less; a spool is never short
            more = os.pread(self._fd, size - len(data), offset + len(data))
            if not more:
                raise RepoError(f"internal: rendered bytes at {offset} missing from spool")
            data += more
        return data


@dataclass(frozen=True, eq=False)
class RenderedContent:
    """Bytes a template rendered, kept in a spool file until the tar is written: a
    build holds no fleet's worth of rendered files in memory, and a render worker
    sends back where it put them, not the bytes."""

    spool: Spool
    offset: int
    size: int

    @property
    def data(self) -> bytes:
        return self.spool.read(self.offset, self.size)

    def chunks(self, reader: BlobReader, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        del reader  # same signature as BlobContent.chunks; nothing to read
        for start in range(0, self.size, chunk):
            yield self.spool.read(self.offset + start, min(chunk, self.size - start))

    def __eq__(self, other: object) -> bool:
        # Equal when the bytes are: which spool holds them, and where, is incidental.
        if not isinstance(other, RenderedContent):
            return NotImplemented
        return self.size == other.size and self.data == other.data

    __hash__ = None  # type: ignore[assignment]  # equal by bytes read back


@dataclass(frozen=True)
class BlobContent:
    """A static file: a git blob of the commit, streamed when the tar is written."""

    oid: str
    size: int

    def chunks(self, reader: BlobReader, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        yield from reader.stream(self.oid, chunk)


Content = RenderedContent | BlobContent


@dataclass(frozen=True)
class Fleet:
    """Every selected host's files (sorted by path) and the contents they name."""

    commit: str
    path: str  # the subdirectory of the repo that holds gitops.yaml ('' = root)
    config_path: str  # repo-relative, e.g. "infra/gitops.yaml"
    hosts: Mapping[str, HostEntry]
    contents: Mapping[str, Content]
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Each distinct (digest, size) once: 110,000 entries of a 200-host fleet name
        # 10,500 (the pairs are gathered in C, not in a Python loop).
        pairs: set[tuple[str, int]] = set()
        for host in self.hosts.values():
            pairs.update(map(_DIGEST_SIZE, host.files))
        for digest, size in pairs:
            content = self.contents.get(digest)
            if content is None or content.size != size:
                name, f = next((n, f) for n, h in self.hosts.items() for f in h.files
                               if f.sha256 == digest)
                raise RepoError(f"internal: {name}:{f.path} has no matching content")


_DIGEST = operator.attrgetter("sha256")
_DIGEST_SIZE = operator.attrgetter("sha256", "size")


# -- the job shipped to every worker --------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """What a renderer needs to start: enough to compile the templates."""

    repo: GitRepo
    commit: str
    prefix: str  # "infra/" or ""
    tree: Mapping[str, TreeEntry]
    config: RepoConfig
    spool_dir: str  # where each renderer writes its own spool file


@dataclass(frozen=True)
class _Compiled:
    """Templates one worker compiled, for the others: what a loader read and what the
    compiler made of it (Jinja bytecode, checked against the source's checksum)."""

    sources: Mapping[str, bytes] = field(default_factory=dict)  # blob oid -> bytes
    bytecode: Mapping[str, bytes] = field(default_factory=dict)  # bucket key -> bytes

    @classmethod
    def merge(cls, parts: Sequence[_Compiled]) -> _Compiled:
        return cls(sources={k: v for p in parts for k, v in p.sources.items()},
                   bytecode={k: v for p in parts for k, v in p.bytecode.items()})


@dataclass(frozen=True)
class _Data:
    """What rendering a host needs besides the job: read while the workers compile."""

    hostvars: Mapping[str, Mapping[str, Any]]
    static: Mapping[str, tuple[str, int]]  # blob oid -> (sha256, size)
    compiled: _Compiled = field(default_factory=_Compiled)


@dataclass(frozen=True)
class _HostResult:
    name: str
    entry: HostEntry
    rendered: dict[str, _Spooled] = field(default_factory=dict)  # by sha256


def render_fleet(
    repo: GitRepo,
    commit: str,
    subpath: str = "",
    hosts: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    jobs: int | None = None,
) -> Fleet:
    """Render every host (or only ``hosts``) of the fleet defined at ``commit:subpath``.

    ``progress`` is called with the number of hosts just finished (tqdm's ``update``).
    ``jobs`` worker processes render hosts in chunks; by default one per CPU when there
    are more than ``PARALLEL_THRESHOLD`` hosts. The result does not depend on ``jobs``.
    """
    commit = repo.resolve(commit)
    sub = normalise_subpath(subpath)
    prefix = f"{sub}/" if sub else ""
    config_path = prefix + CONFIG_NAME
    tree = repo.list_tree(commit, sub)
    warnings: list[str] = []

    with repo.blob_reader() as reader:
        config = RepoConfig.parse(_read_config(tree, reader, config_path, commit),
                                  config_path)
    selected = _select(config, hosts)
    specs = [s for s in config.files if any(s.selects(config.hosts[h]) for h in selected)]
    if jobs is None:
        jobs = (os.cpu_count() or 1) if len(selected) > PARALLEL_THRESHOLD else 1
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    chunks = _chunks(selected, jobs)
    templates = sorted({s.src for s in specs if s.is_template})
    # Every renderer writes what it renders to its own file here; the result opens
    # them before the directory goes.
    spool_dir = tempfile.TemporaryDirectory(prefix="gitops-bundle-render-")
    job = _Job(repo=repo, commit=commit, prefix=prefix, tree=tree, config=config,
               spool_dir=spool_dir.name)
    # Workers start before the variables are read: they compile the templates while
    # this process parses the vars files and hashes the static files.
    try:
        with spool_dir, _workers(job, templates, min(jobs, len(chunks))) as workers:
            with repo.blob_reader() as reader:
                var_files = _read_var_files(config, tree, reader, prefix, warnings)
                hostvars = {name: config.vars_for(name, var_files) for name in config.hosts}
                if hosts is None:
                    # By identity: `s not in specs` compared dataclasses pairwise, quadratic
                    # in the number of files (46 s of a 10,000-file build).
                    chosen = {id(s) for s in specs}
                    warnings.extend(f"{s.where()}: selects no host" for s in config.files
                                    if id(s) not in chosen)
                static: dict[str, tuple[str, int]] = {}
                for spec in specs:
                    entry = _source(spec, tree, prefix, commit)
                    if not spec.is_template and entry.oid not in static:
                        # Streamed through the batch reader: a 1 GiB file is never in memory.
                        static[entry.oid] = reader.hash(entry.oid)
            if workers is None:
                results = _render_here(job, _Data(hostvars=hostvars, static=static), selected,
                                       progress)
            else:
                pool, compiling = workers
                compiled = _Compiled.merge([f.result() for f in compiling])
                data = _Data(hostvars=hostvars, static=static, compiled=compiled)
                results = _render_in(pool, data, chunks, progress)
                # The workers exit while the results are put together here.
                pool.shutdown(wait=False)
            return _assemble(job, sub, static, results, warnings)
    except RepoError:
        # A hint found before the failure may be its explanation (a vars file
        # named vars/web-01.yml matches no host, so 'port' is undefined).
        for w in warnings:
            logger.warning("%s", w)
        raise


def _assemble(job: _Job, sub: str, static: Mapping[str, tuple[str, int]],
              results: list[_HostResult], warnings: list[str]) -> Fleet:
    """The ``Fleet`` of these hosts' results, with only the contents they use."""
    config_path = job.prefix + CONFIG_NAME
    contents: dict[str, Content] = {}
    for oid, (digest, size) in static.items():
        contents[digest] = BlobContent(oid=oid, size=size)
    spools: dict[str, Spool] = {}
    for result in results:
        for digest, (path, offset, size) in result.rendered.items():
            if digest not in contents:
                spool = spools.get(path)
                if spool is None:
                    spool = spools[path] = _open_spool(path)
                contents[digest] = RenderedContent(spool, offset, size)
        if not result.entry.files:
            warnings.append(f"{config_path}: host {result.name!r} gets no files")
    host_entries = {r.name: r.entry for r in sorted(results, key=lambda r: r.name)}
    used: set[str] = set()
    for entry in host_entries.values():
        used.update(map(_DIGEST, entry.files))
    logger.debug("rendered %d hosts, %d distinct contents from %s at %s", len(host_entries),
                 len(used), config_path, job.commit[:12])
    return Fleet(
        commit=job.commit, path=sub, config_path=config_path, hosts=host_entries,
        contents={d: contents[d] for d in sorted(used)}, warnings=tuple(warnings),
    )


def _open_spool(path: str) -> Spool:
    try:
        return Spool(path)
    except OSError as e:
        raise OutputError(str(_fs.io_error(e, f"cannot read back rendered files: {path}"))
                          ) from e


class _SpoolWriter:
    """One renderer's spool file: each distinct rendered content appended once.

    Buffered, and written out by ``flush`` (a worker's chunk ends with one: the
    parent reads the file after the results arrive, and a worker exits unflushed).
    """

    _BUFFER = 1 << 20

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._fd: int | None = None
        self.path = ""
        self._end = 0  # bytes written or buffered
        self._buffer = bytearray()
        self._where: dict[str, _Spooled] = {}

    def add(self, digest: str, data: bytes) -> _Spooled:
        where = self._where.get(digest)
        if where is None:
            if self._fd is None:
                self._fd, self.path = self._attempt(
                    lambda: tempfile.mkstemp(suffix=".spool", dir=self._directory))
                weakref.finalize(self, os.close, self._fd)
            where = self._where[digest] = (self.path, self._end, len(data))
            self._end += len(data)
            self._buffer += data
            if len(self._buffer) >= self._BUFFER:
                self.flush()
        return where

    def flush(self) -> None:
        fd, buffer = self._fd, self._buffer
        while buffer and fd is not None:
            written = self._attempt(lambda: os.write(fd, buffer))
            del buffer[:written]

    def _attempt(self, op: Callable[[], _T]) -> _T:
        try:
            return op()
        except OSError as e:
            raise OutputError(str(_fs.io_error(
                e, f"cannot keep rendered files in {self._directory}"))) from e


# -- reading the commit ------------------------------------------------------------------


def _read_config(tree: Mapping[str, TreeEntry], reader: BlobReader, config_path: str,
                 commit: str) -> bytes:
    entry = tree.get(CONFIG_NAME)
    if entry is None:
        raise RepoConfigError(f"{config_path}: not found in commit {commit[:12]}")
    if not entry.is_regular:
        raise RepoConfigError(f"{config_path}: is {entry.kind} in commit {commit[:12]}")
    return reader.read(entry.oid)


def _select(config: RepoConfig, hosts: Sequence[str] | None) -> list[str]:
    if hosts is None:
        return list(config.hosts)
    selected: list[str] = []
    for name in hosts:
        if name not in config.hosts:
            close = difflib.get_close_matches(name, list(config.hosts), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RepoConfigError(f"{config.path}: unknown host {name!r}{hint}")
        if name not in selected:
            selected.append(name)
    return selected


def _read_var_files(config: RepoConfig, tree: Mapping[str, TreeEntry], reader: BlobReader,
                    prefix: str, warnings: list[str]) -> dict[str, dict[str, Any]]:
    expected = {host_vars_path(h) for h in config.hosts}
    expected |= {group_vars_path(g) for g in config.groups}
    out: dict[str, dict[str, Any]] = {}
    for path, entry in tree.items():
        if posixpath.dirname(path) != VARS_DIR or not path.endswith((".yaml", ".yml")):
            continue
        if path not in expected:
            # A misspelt vars/frodoo.yaml would otherwise be silently ignored.
            close = difflib.get_close_matches(path, sorted(expected), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            warnings.append(f"{prefix}{path}: matches no host or group{hint}")
            continue
        if not entry.is_regular:
            raise RepoConfigError(f"{prefix}{path}: is {entry.kind}; vars files must be "
                                  "regular files")
        out[path] = parse_vars_file(reader.read(entry.oid), prefix + path)
    return out


def _source(spec: FileSpec, tree: Mapping[str, TreeEntry], prefix: str,
            commit: str) -> TreeEntry:
    entry = tree.get(spec.src)
    where = spec.where("src")
    if entry is None:
        if any(p.startswith(spec.src + "/") for p in tree):
            raise MissingSourceError(f"{where}: {spec.src!r} is a directory; list its files "
                                     "one by one")
        close = difflib.get_close_matches(spec.src, list(tree), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MissingSourceError(f"{where}: {prefix}{spec.src} does not exist in commit "
                                 f"{commit[:12]}{hint}")
    if not entry.is_regular:
        raise MissingSourceError(f"{where}: {prefix}{spec.src} is {entry.kind} in commit "
                                 f"{commit[:12]}; only regular files can be shipped")
    return entry


# -- rendering, in this process or a worker ------------------------------------------------


def _chunks(names: list[str], jobs: int) -> list[list[str]]:
    """The hosts in work units: one for a single process, several per worker else."""
    if jobs == 1 or len(names) <= 1:
        return [names]
    size = max(1, math.ceil(len(names) / (jobs * _CHUNKS_PER_JOB)))
    return [names[i:i + size] for i in range(0, len(names), size)]


@contextlib.contextmanager
def _workers(job: _Job, templates: list[str], count: int,
             ) -> Iterator[tuple[ProcessPoolExecutor, list[Future[_Compiled]]] | None]:
    """``count`` worker processes, started now, and the futures of their compiling
    ``templates`` (each a share); or None to render in this process (``count`` 1)."""
    if count <= 1:
        yield None
        return
    # fork is the cheapest start (no new interpreter, no re-import of Jinja2, the job is
    # not pickled: about 0.5 s of a 200-host render); no blob reader is open here.
    # A thread (a progress bar's monitor, a caller's) means forkserver or spawn instead.
    if fork_is_safe():
        method = "fork"
    else:
        method = ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                  else "spawn")
    logger.debug("starting %d %s workers", count, method)
    with ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context(method),
                             initializer=_init_worker, initargs=(job,)) as pool:
        # The first task starts every forked worker at once (other methods start one
        # per task): their compiling overlaps what the caller reads next. Each compiles
        # a share and hands back the bytecode, which every worker then loads: a worker
        # compiling all 50 templates of a fleet took longer than the caller's reading.
        compiling = [pool.submit(_compile_share, templates[i::count]) for i in range(count)]
        yield pool, compiling


def _render_here(job: _Job, data: _Data, names: list[str],
                 progress: Callable[[int], None] | None) -> list[_HostResult]:
    renderer = _Renderer(job)
    renderer.use(data)
    try:
        results = []
        for name in names:
            results.append(renderer.host(name))
            if progress is not None:
                progress(1)
        return results
    finally:
        renderer.release()


def _render_in(pool: ProcessPoolExecutor, data: _Data, chunks: list[list[str]],
               progress: Callable[[int], None] | None) -> list[_HostResult]:
    # Pickled once here, not once per task; a worker unpickles it once.
    shared = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
    by_chunk: dict[int, list[_HostResult]] = {}
    logger.debug("rendering %d hosts in %d chunks", sum(map(len, chunks)), len(chunks))
    futures = {pool.submit(_render_chunk, chunk, shared): i for i, chunk in enumerate(chunks)}
    for future in as_completed(futures):
        i = futures[future]
        by_chunk[i] = future.result()
        if progress is not None:
            progress(len(chunks[i]))
    return [r for i in range(len(chunks)) for r in by_chunk[i]]


def fork_is_safe() -> bool:
    """Whether this process may fork a worker: fork exists, and no other thread runs
    (a lock another thread holds would stay held, forever, in the child)."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


# One renderer per worker process: its templates compile once, not once per chunk
# (compiling 50 templates per chunk made two workers slower than one process).
_WORKER: dict[str, _Renderer] = {}


def _init_worker(job: _Job) -> None:
    # A forked worker inherits the CLI's SIGTERM handler; the pool stops its workers
    # with SIGTERM, which must end them, not raise inside them.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The job (tree, config) is sent once per worker, not per chunk.
    _WORKER["renderer"] = _Renderer(job)


def _compile_share(names: list[str]) -> _Compiled:
    renderer = _WORKER["renderer"]
    try:
        return renderer.compile(names)
    finally:
        renderer.release()


def _render_chunk(names: list[str], shared: bytes) -> list[_HostResult]:
    renderer = _WORKER["renderer"]
    if not renderer.has_data:  # this worker's first chunk
        renderer.use(pickle.loads(shared))  # noqa: S301 - our own parent's
    try:
        return [renderer.host(name) for name in names]
    finally:
        renderer.release()


class _TemplateSource:
    """Template sources through one ``git cat-file`` reader, started at the first read:
    a worker's chunk seldom reads one (the templates were compiled, and their sources
    read, before its first chunk). Every source read is kept (they are small)."""

    def __init__(self, repo: GitRepo) -> None:
        self._repo = repo
        self._reader: BlobReader | None = None
        self.read_so_far: dict[str, bytes] = {}

    def read(self, oid: str) -> bytes:
        data = self.read_so_far.get(oid)
        if data is None:
            if self._reader is None:
                self._reader = self._repo.blob_reader()
            data = self.read_so_far[oid] = self._reader.read(oid)
        return data

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()


class _SharedBytecode(jinja2.BytecodeCache):
    """Compiled templates kept as bytes, so that what one worker compiled another
    loads. Jinja checks each against its source's checksum (and its own and Python's
    version) before using it, and compiles the source when they differ."""

    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        data = self.store.get(bucket.key)
        if data is not None:
            bucket.bytecode_from_string(data)

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        self.store[bucket.key] = bucket.bytecode_to_string()


class _CommitLoader(jinja2.BaseLoader):
    """Templates from the commit's tree: names are paths from gitops.yaml's directory."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self.source = _TemplateSource(job.repo)
        self.served: set[str] = set()  # display names, to find template frames

    def get_source(self, environment: jinja2.Environment, template: str,
                   ) -> tuple[str, str, Callable[[], bool]]:
        name = posixpath.normpath(template)
        entry = self._job.tree.get(name)
        if entry is None or name.startswith(("/", "../")):
            raise jinja2.TemplateNotFound(template)
        display = self._job.prefix + name
        if not entry.is_regular:
            raise jinja2.TemplateNotFound(template, f"{display} is {entry.kind}")
        try:
            source = self.source.read(entry.oid).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TemplateRenderError(f"{display}: not UTF-8 text (byte {e.start})") from e
        self.served.add(display)
        return source, display, lambda: True


class _Renderer:
    """Renders hosts one by one with one environment (templates compile once)."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._data: _Data | None = None
        self._loader = _CommitLoader(job)
        self._bytecode = _SharedBytecode()
        self._env = ImmutableSandboxedEnvironment(
            loader=self._loader,
            bytecode_cache=self._bytecode,
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,
            cache_size=-1,
        )
        self._env.filters["quote"] = _quote
        self._inline: dict[str, jinja2.Template] = {}
        self._splittable: set[str] = set()  # rendered commands shlex has split
        self._all_hosts = list(job.config.hosts)
        # One FileEntry per distinct (spec, dest, content, commands): most files (every
        # static one with a plain dest) are equal for every host, so a host reuses the
        # entry an earlier host built instead of building and checking it again, and a
        # chunk's result pickles each shared entry once (pickle memoises by identity).
        # The parent unpickled 110,000 entries of a 200-host fleet, serially, before.
        self._entries: dict[tuple[Any, ...], FileEntry] = {}
        self._dests: set[str] = set()  # passed check_target_path
        # The command lists each spec has (most have none; the others default to ()).
        self._command_kinds = [
            tuple(kind for kind in ("validate", "check", "on_change", "health")
                  if getattr(fspec, kind))
            for fspec in job.config.files
        ]
        # A static file whose dest and commands are plain text is the same entry on
        # every host: built (and checked) for the first host that has it, then reused
        # as it is (a 200-host fleet's 100,000 static entries were each rebuilt).
        self._same_everywhere = [
            not fspec.is_template and not _is_template_text(fspec.dest) and not any(
                _is_template_text(c.run) for kind in kinds for c in getattr(fspec, kind))
            for fspec, kinds in zip(job.config.files, self._command_kinds, strict=True)
        ]
        self._built: dict[int, FileEntry] = {}  # spec index -> entry, for those
        self._spool = _SpoolWriter(job.spool_dir)

    def use(self, data: _Data) -> None:
        """Render hosts with ``data`` from now on (and load the templates it carries
        compiled, rather than compile them again)."""
        self._data = data
        self._loader.source.read_so_far.update(data.compiled.sources)
        self._bytecode.store.update(data.compiled.bytecode)

    @property
    def has_data(self) -> bool:
        return self._data is not None

    def release(self) -> None:
        """Write out what was rendered, and stop the git reader that templates were
        read through, if one started (a worker between chunks); the next template read
        starts another."""
        try:
            self._spool.flush()
        finally:
            self._loader.source.close()

    def compile(self, names: list[str]) -> _Compiled:
        """Compile these templates ahead of the first host; what was read and compiled
        (with any template they include or import), for other renderers to load.

        Errors are left for rendering to raise: there they name the host.
        """
        for name in names:
            try:
                self._env.get_template(name)
            except Exception as e:  # noqa: BLE001 - a template's own error, raised later
                logger.debug("%s: not compiled ahead (%s)", name, e)
        return _Compiled(sources=dict(self._loader.source.read_so_far),
                         bytecode=dict(self._bytecode.store))

    def host(self, name: str) -> _HostResult:
        job, data = self._job, self._data
        if data is None:
            raise AssertionError("host rendered before use(data)")
        spec = job.config.hosts[name]
        context = dict(data.hostvars[name])
        context.update(host=name, groups=list(spec.groups), hosts=self._all_hosts,
                       hostvars=data.hostvars)
        files: dict[str, tuple[FileSpec, FileEntry]] = {}
        rendered: dict[str, _Spooled] = {}
        for i, fspec in enumerate(job.config.files):
            if not fspec.selects(spec):
                continue
            entry = self._built.get(i)
            if entry is None:
                entry = self._file(i, fspec, name, context, rendered, data.static)
                if self._same_everywhere[i]:
                    self._built[i] = entry
            if entry.path in files:
                other = files[entry.path][0]
                raise RepoConfigError(
                    f"{fspec.where('dest')}: {entry.path} for host {name} is also the dest "
                    f"of {other.label} (line {other.lines.get('dest', '?')})")
            files[entry.path] = (fspec, entry)
        try:
            host_entry = HostEntry(tuple(files[p][1] for p in sorted(files)))
        except ManifestError as e:
            raise RepoConfigError(f"{job.config.path}: host {name}: {e}") from e
        return _HostResult(name=name, entry=host_entry, rendered=rendered)

    def _file(self, index: int, fspec: FileSpec, host: str, context: dict[str, Any],
              rendered: dict[str, _Spooled],
              static: Mapping[str, tuple[str, int]],
              ) -> FileEntry:
        """The entry of ``job.config.files[index]`` for ``host``, shared when equal."""
        job = self._job
        dest = self._inline_render(fspec.dest, fspec, "dest", host, context)
        if dest not in self._dests:
            try:
                check_target_path(dest)
            except ManifestError as e:
                # The check's own reason (not NFC, a component over 255 bytes, ...).
                why = str(e).removeprefix("manifest path: ").removeprefix(repr(dest) + " ")
                raise RepoConfigError(f"{fspec.where('dest')}: {dest!r} (host {host}) "
                                      f"{why}") from e
            for protected in PROTECTED:
                if within(dest, protected) or within(protected, dest):
                    raise RepoConfigError(
                        f"{fspec.where('dest')}: {dest!r} (host {host}) is or holds the "
                        f"applier's own config and state ({protected}): every host refuses it")
            self._dests.add(dest)
        source = job.tree[fspec.src]
        if fspec.is_template:
            text = self._template_render(fspec.src, host, context)
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate, from a filter or a var
                raise TemplateRenderError(
                    f"{self._job.prefix}{fspec.src}: renders text that is not valid Unicode "
                    f"(U+{ord(text[e.start]):04X} at character {e.start}; host {host})") from e
            digest = hashlib.sha256(data).hexdigest()
            rendered[digest] = self._spool.add(digest, data)
            size = len(data)
        else:
            digest, size = static[source.oid]
        commands = {
            name: tuple(
                Command(run=self._command_text(c.run, fspec, f"{name}[{i}]", host, context),
                        timeout=c.timeout, retries=c.retries, delay=c.delay)
                for i, c in enumerate(getattr(fspec, name))
            )
            for name in self._command_kinds[index]
        }
        # Every other field comes from the spec and its source blob.
        key = (index, dest, digest, *commands.values())
        entry = self._entries.get(key)
        if entry is not None:
            return entry  # built (and so checked) for an earlier host
        mode = fspec.mode if fspec.mode is not None else (
            0o755 if source.is_executable else 0o644)
        try:
            entry = FileEntry(path=dest, sha256=digest, size=size, mode=mode, owner=fspec.owner,
                              group=fspec.group, drift=fspec.drift, **commands)
        except ManifestError as e:
            raise RepoConfigError(f"{fspec.where()}: host {host}: {e}") from e
        self._entries[key] = entry
        return entry

    def _template_render(self, name: str, host: str, context: dict[str, Any]) -> str:
        display = self._job.prefix + name
        try:
            return self._env.get_template(name).render(context)
        except RepoError:
            raise
        except Exception as e:  # templates are user code: any error is theirs
            raise self._error(e, host, display) from e

    def _command_text(self, text: str, fspec: FileSpec, key: str, host: str,
                      context: dict[str, Any]) -> str:
        """A command as rendered for ``host``, split here as the host will split it:
        an unbalanced quote fails the build, not the apply on the far side of the gap."""
        run = self._inline_render(text, fspec, key, host, context)
        if run not in self._splittable:  # most commands read the same for every host
            try:
                shlex.split(run)
            except ValueError as e:
                raise RepoConfigError(f"{fspec.where(key)}: {run!r} (host {host}) cannot be "
                                      f"split into arguments: {str(e).lower()}") from e
            self._splittable.add(run)
        return run

    def _inline_render(self, text: str, fspec: FileSpec, key: str, host: str,
                       context: dict[str, Any]) -> str:
        """A ``dest`` or command string: a Jinja template only if it has ``{{``/``{%``."""
        if not _is_template_text(text):
            return text
        try:
            template = self._inline.get(text)
            if template is None:
                template = self._inline[text] = self._env.from_string(text)
            out = template.render(context)
        except RepoError:
            raise
        except Exception as e:  # see _template_render
            raise self._error(e, host, fspec.where(key), inline=True) from e
        if "\n" in out or not out.strip():
            raise RepoConfigError(f"{fspec.where(key)}: renders to {out!r} for host {host}")
        return out

    def _error(self, e: Exception, host: str, fallback: str,
               *, inline: bool = False) -> TemplateRenderError:
        """One line: 'templates/x.j2:14: 'port' is undefined (host frodo)'."""
        if isinstance(e, jinja2.TemplateSyntaxError) and e.filename and e.lineno:
            where = f"{e.filename}:{e.lineno}"
        else:
            where = _template_frame(e, self._loader.served) or fallback
        if inline and where != fallback:
            where = f"{fallback} -> {where}"  # e.g. a macro imported into a dest
        if isinstance(e, jinja2.TemplateNotFound) and not isinstance(
                e, jinja2.TemplatesNotFound):
            what = (f"template {e.name!r} not found" if e.message == e.name
                    else f"template {e.name!r}: {e.message}")
        elif isinstance(e, jinja2.TemplateSyntaxError):
            what = f"syntax error: {e.message}"
        elif isinstance(e, jinja2.UndefinedError | SecurityError):
            what = e.message or str(e)
        else:
            what = f"{type(e).__name__}: {e}"
        return TemplateRenderError(f"{where}: {what} (host {host})")


def _quote(value: Any) -> str:
    """The ``quote`` filter: shell quoting of any value's text (a port is a number)."""
    return shlex.quote(str(value))


def _is_template_text(text: str) -> bool:
    """Whether a ``dest`` or command string holds Jinja syntax (else it is used as is)."""
    return "{{" in text or "{%" in text or "{#" in text


def _template_frame(e: BaseException, served: set[str]) -> str | None:
    """The innermost template line in the traceback (Jinja rewrites frames to them)."""
    found = None
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename in served and frame.lineno:
            found = f"{frame.filename}:{frame.lineno}"
    return found
