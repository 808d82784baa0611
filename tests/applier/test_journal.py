"""The transaction journal reads back as written, whatever the paths hold.

Recovery after a crash rebuilds the whole transaction from ``journal.json`` alone; an
operator may read it by hand when recovery cannot run, so it keeps an op per line.
"""

from __future__ import annotations

import json

from applier.transaction import Journal, Op

AWKWARD = ['/etc/a "quoted" \\ name', "/opt/grüße/世界.conf", "/etc/new\nline",
           '/etc/"ops": null', "/etc/tab\there"]


def _journal(ops: list[Op]) -> Journal:
    return Journal(txid="0123456789ab", purpose="apply", new_bundle="3-00fd12ef8b28",
                   ops=ops, dirs=["/opt/grüße", '/etc/"dir"'],
                   on_change=[{"run": 'systemctl reload "ops"', "timeout": 30}],
                   phase="swapping")


def test_a_journal_reads_back_exactly_as_written() -> None:
    ops = [Op("add", p, "/root" + p, temp=p + ".new", sha256="ab" * 32) for p in AWKWARD]
    ops.append(Op("remove", "/etc/old", "/etc/old", backup="/etc/.gitops-x-5.old"))
    for journal in (_journal(ops), _journal([])):
        data = journal.to_bytes()
        assert Journal.from_bytes(data) == journal
        assert json.loads(data)["ops"] == [vars(op) for op in journal.ops]


def test_a_journal_has_an_op_per_line() -> None:
    ops = [Op("change", p, p, temp=p + ".new", backup=p + ".old", sha256="cd" * 32)
           for p in AWKWARD]
    lines = _journal(ops).to_bytes().decode().splitlines()
    assert len(lines) == len(ops) + 2
    assert [json.loads(line.rstrip(",")) for line in lines[1:-1]] == [vars(op) for op in ops]
