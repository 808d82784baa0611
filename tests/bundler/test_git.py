"""bundler.git against real git: revisions, trees, blobs, and the history bundle."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from fleetrepo import DATE_UNIX, FleetRepo, run_git

from applier.errors import ExitCode
from bundler.errors import BuildError, GitError
from bundler.git import GitRepo, normalise_subpath

from conftest import _unavailable

# -- the tests ------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> FleetRepo:
    return FleetRepo.create(tmp_path / "repo")


@pytest.fixture
def repo(fleet: FleetRepo) -> GitRepo:
    return GitRepo(fleet.path)


def test_git_error_is_a_repo_build_error() -> None:
    assert issubclass(GitError, BuildError)
    assert GitError.exit_code == ExitCode.REPO


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(GitError, match="not a git repository"):
        GitRepo(tmp_path)
    with pytest.raises(GitError, match="no such directory"):
        GitRepo(tmp_path / "missing")


def test_a_repository_owned_by_someone_else_names_the_cause(
        fleet: FleetRepo, monkeypatch: pytest.MonkeyPatch) -> None:
    """git's first 'fatal:' line is the cause; its last line is only a hint (the
    safe.directory command), which alone reads as 'not a git repository: git config'."""
    if os.geteuid() != 0:
        _unavailable("giving the repository to another user needs root")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)  # no safe.directory=* from home
    os.chown(fleet.path, 65534, 65534)
    with pytest.raises(GitError, match="detected dubious ownership"):
        GitRepo(fleet.path).resolve("HEAD")


def test_resolve_names_full_commit_ids(fleet: FleetRepo, repo: GitRepo) -> None:
    head = fleet.git("rev-parse", "HEAD").strip()
    assert repo.resolve("HEAD") == head
    assert repo.resolve("main") == head
    assert repo.resolve(head[:10]) == head
    fleet.git("tag", "-a", "-m", "release", "v1")
    assert repo.resolve("v1") == head  # an annotated tag peels to its commit


@pytest.mark.parametrize(
    ("rev", "message"),
    [
        ("nope", r"^'nope' is not a commit in \S+$"),  # git says nothing: no ": ..."
        ("HEAD^{tree}", "is not a commit"),
        ("--all", "is not a revision"),
        ("", "is not a revision"),
    ],
    ids=["unknown", "tree", "option", "empty"],
)
def test_resolve_rejects(repo: GitRepo, rev: str, message: str) -> None:
    with pytest.raises(GitError, match=message):
        repo.resolve(rev)


def test_commit_info(fleet: FleetRepo, repo: GitRepo) -> None:
    head = fleet.git("rev-parse", "HEAD").strip()
    info = repo.commit_info("HEAD")
    assert info.commit == head
    assert info.tree == fleet.git("rev-parse", "HEAD^{tree}").strip()
    assert info.author == "Fleet Admin <admin@example.org>"
    assert info.time == DATE_UNIX
    assert info.subject == "Import the example fleet"
    assert info.branch == "main"
    assert repo.commit_info("main").branch == "main"
    assert repo.commit_info(head).branch is None
    fleet.git("checkout", "--quiet", "--detach")
    assert repo.commit_info("HEAD").branch is None


def test_toplevel_from_a_subdirectory(fleet: FleetRepo) -> None:
    sub = GitRepo(fleet.path / "templates")
    assert sub.toplevel == fleet.path.resolve()
    assert sub.resolve("HEAD") == GitRepo(fleet.path).resolve("HEAD")


def test_is_dirty(fleet: FleetRepo, repo: GitRepo) -> None:
    assert not repo.is_dirty()
    fleet.write("untracked.txt", "x")
    assert repo.is_dirty()
    (fleet.root / "untracked.txt").unlink()
    fleet.replace("vars/frodo.yaml", "8081", "9999")
    assert repo.is_dirty()
    fleet.commit()
    assert not repo.is_dirty()


def test_count_commits(fleet: FleetRepo, repo: GitRepo) -> None:
    assert repo.count_commits("HEAD") == 1
    fleet.commit("second")
    fleet.commit("third")
    assert repo.count_commits("HEAD") == 3
    assert repo.count_commits("HEAD~1") == 2


def test_list_tree(repo: GitRepo) -> None:
    tree = repo.list_tree("HEAD")
    conf = tree["gitops.yaml"]
    assert conf.mode == "100644"
    assert conf.is_regular
    assert conf.size == len((Path(__file__).parents[2] / "examples/fleet/gitops.yaml")
                            .read_bytes())
    assert "templates/nginx/nginx.conf.j2" in tree


def test_list_tree_subpath_is_relative(tmp_path: Path) -> None:
    fleet = FleetRepo.create(tmp_path / "repo", subdir="infra/prod")
    repo = GitRepo(fleet.path)
    tree = repo.list_tree("HEAD", "infra/prod")
    assert "gitops.yaml" in tree
    assert repo.list_tree("HEAD", "infra/prod/") == tree
    assert "prod/gitops.yaml" in repo.list_tree("HEAD", "infra")
    with pytest.raises(GitError, match="does not exist"):
        repo.list_tree("HEAD", "infra/staging")
    with pytest.raises(GitError, match="not a directory"):
        repo.list_tree("HEAD", "infra/prod/gitops.yaml")


@pytest.mark.parametrize("subpath", ["../x", "/etc", "a/../../b", "a\\b"])
def test_subpath_must_stay_inside(subpath: str) -> None:
    with pytest.raises(GitError, match="inside the repository"):
        normalise_subpath(subpath)


def test_list_tree_reports_symlinks_submodules_and_exec_bits(fleet: FleetRepo,
                                                              repo: GitRepo) -> None:
    os.symlink("motd.j2", fleet.root / "templates" / "link.j2")
    script = fleet.write("files/run.sh", "#!/bin/sh\n")
    script.chmod(0o755)
    head = fleet.commit("links")
    blob = fleet.git("rev-parse", "HEAD:gitops.yaml").strip()
    # A gitlink entry, as `git submodule add` would make, without needing a remote.
    fleet.git("update-index", "--add", "--cacheinfo", f"160000,{head},vendor/lib")
    fleet.git("commit", "--quiet", "-m", "submodule")
    tree = repo.list_tree("HEAD")
    assert tree["templates/link.j2"].is_symlink
    assert tree["templates/link.j2"].kind == "a symlink"
    assert tree["vendor/lib"].is_submodule
    assert tree["vendor/lib"].size is None
    assert tree["vendor/lib"].kind == "a submodule"
    assert tree["files/run.sh"].is_executable
    assert tree["gitops.yaml"].oid == blob


def test_read_blob_and_batch_reader(fleet: FleetRepo, repo: GitRepo) -> None:
    tree = repo.list_tree("HEAD")
    paths = sorted(p for p, e in tree.items() if e.is_regular)
    with repo.blob_reader() as reader:
        for path in paths:
            data = reader.read(tree[path].oid)
            assert data == (fleet.root / path).read_bytes(), path
            assert data == repo.read_blob(tree[path].oid)
        with pytest.raises(GitError, match="missing"):
            reader.read("0" * 40)
        # The reader stays usable after a miss.
        assert reader.read(tree["gitops.yaml"].oid) == fleet.read("gitops.yaml").encode()


def test_reader_rejects_non_blobs_and_bad_ids(repo: GitRepo) -> None:
    tree_id = repo.commit_info("HEAD").tree
    with repo.blob_reader() as reader:
        with pytest.raises(GitError, match="is a tree, not a blob"):
            reader.read(tree_id)
        with pytest.raises(GitError, match="not an object id"):
            reader.read("HEAD")


def test_big_blob_is_streamed_in_chunks(fleet: FleetRepo, repo: GitRepo) -> None:
    data = os.urandom(3 << 20) + b"tail"
    fleet.write("files/big.bin", data)
    fleet.commit("big")
    oid = repo.list_tree("HEAD")["files/big.bin"].oid
    chunks = list(repo.stream_blob(oid, chunk=1 << 20))
    assert max(len(c) for c in chunks) <= 1 << 20
    assert b"".join(chunks) == data
    with repo.blob_reader() as reader:
        pieces = list(reader.stream(oid, chunk=1 << 20))
        assert max(len(p) for p in pieces) <= 1 << 20
        assert b"".join(pieces) == data
        assert reader.hash(oid) == (hashlib.sha256(data).hexdigest(), len(data))
        # Abandoning a stream half way leaves the reader in sync for the next blob.
        stream = reader.stream(oid, chunk=4096)
        next(stream)
        stream.close()
        assert reader.read(repo.list_tree("HEAD")["gitops.yaml"].oid).startswith(b"#")


def test_stream_blob_of_missing_object_fails(repo: GitRepo) -> None:
    with pytest.raises(GitError, match="cannot read blob"):
        list(repo.stream_blob("1" * 40))


def test_reader_refuses_a_request_during_a_stream(fleet: FleetRepo, repo: GitRepo) -> None:
    oid = repo.list_tree("HEAD")["gitops.yaml"].oid
    with repo.blob_reader() as reader:
        stream = reader.stream(oid, chunk=16)
        next(stream)
        with pytest.raises(GitError, match="previous stream"):
            reader.read(oid)
        stream.close()


def _refs_and_objects(path: Path) -> tuple[str, list[str]]:
    refs = run_git(path, "for-each-ref").stdout
    files = sorted(str(p.relative_to(path)) for p in (path / ".git").rglob("*") if p.is_file())
    return refs, files


def test_create_bundle(fleet: FleetRepo, repo: GitRepo, tmp_path: Path) -> None:
    fleet.commit("second")
    head = repo.resolve("HEAD")
    before = _refs_and_objects(fleet.path)
    out1, out2 = tmp_path / "one.bundle", tmp_path / "two.bundle"
    tips = repo.create_bundle(head, "refs/heads/gitops", out1)
    repo.create_bundle(head, "refs/heads/gitops", out2)
    assert tips == {"refs/heads/gitops": head}
    assert out1.read_bytes() == out2.read_bytes()
    assert _refs_and_objects(fleet.path) == before  # the user's repo is untouched

    # `git bundle verify` accepts it in an empty repository: no prerequisites.
    empty = tmp_path / "empty"
    run_git(tmp_path, "init", "--quiet", str(empty))
    verify = run_git(empty, "bundle", "verify", str(out1), check=False)
    assert verify.returncode == 0, verify.stderr
    heads = run_git(empty, "bundle", "list-heads", str(out1)).stdout
    assert heads.split() == [head, "refs/heads/gitops"]

    # It carries the full history: a clone from it has both commits.
    clone = tmp_path / "clone"
    run_git(tmp_path, "clone", "--quiet", "--branch", "gitops", str(out1), str(clone))
    assert run_git(clone, "rev-list", "--count", "HEAD").stdout.strip() == "2"


def test_create_bundle_of_an_older_commit(fleet: FleetRepo, repo: GitRepo,
                                          tmp_path: Path) -> None:
    first = repo.resolve("HEAD")
    fleet.commit("second")
    out = tmp_path / "old.bundle"
    repo.create_bundle("HEAD~1", "refs/gitops/bundle", out)
    heads = subprocess.run(["git", "bundle", "list-heads", str(out)], capture_output=True,
                           text=True, check=True, cwd=fleet.path).stdout
    assert heads.split() == [first, "refs/gitops/bundle"]


@pytest.mark.parametrize("ref", ["main", "refs/heads/a..b", "refs/heads/x y"])
def test_create_bundle_rejects_bad_ref_names(repo: GitRepo, tmp_path: Path, ref: str) -> None:
    with pytest.raises(GitError, match="ref name"):
        repo.create_bundle("HEAD", ref, tmp_path / "x.bundle")


def test_a_bundle_started_in_the_background_is_the_same_bundle(
        repo: GitRepo, tmp_path: Path) -> None:
    # The build starts git packing, renders meanwhile, then waits.
    at_once, started = tmp_path / "at-once.bundle", tmp_path / "started.bundle"
    tips = repo.create_bundle("HEAD", "refs/heads/gitops", at_once)
    with repo.start_bundle("HEAD", "refs/heads/gitops", started) as pending:
        assert pending.wait() == tips
    assert started.read_bytes() == at_once.read_bytes()


def test_leaving_a_started_bundle_early_leaves_nothing_behind(
        repo: GitRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    pending = repo.start_bundle("HEAD", "refs/heads/gitops", tmp_path / "x.bundle")
    assert list(scratch.iterdir())  # the scratch repository git packs from
    pending.close()  # as leaving its with-block on a render error does
    assert list(scratch.iterdir()) == []


def test_a_started_bundle_that_git_cannot_write_is_one_error(
        repo: GitRepo, tmp_path: Path) -> None:
    with repo.start_bundle("HEAD", "refs/heads/gitops",
                           tmp_path / "missing" / "x.bundle") as pending, \
            pytest.raises(GitError, match=r"^creating the history bundle: .+$"):
        pending.wait()


def test_create_bundle_refuses_a_shallow_clone(fleet: FleetRepo, tmp_path: Path) -> None:
    fleet.commit("second")
    shallow = tmp_path / "shallow"
    run_git(tmp_path, "clone", "--quiet", "--depth=1", f"file://{fleet.path}", str(shallow))
    with pytest.raises(GitError, match="shallow clone"):
        GitRepo(shallow).create_bundle("HEAD", "refs/heads/x", tmp_path / "x.bundle")
