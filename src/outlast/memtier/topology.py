"""Where the memory tier puts each rank's snapshot, and how a step is recovered (pure).

No I/O and no torch.distributed here: node numbering, mirror partners, XOR parity
groups and their segment assignment, and :func:`plan_recovery`, which turns what every
node found in its shared memory (an *inventory*) into the newest step that can be
recovered and the transfers that rebuild it. Tested with fake inventories in one process.

A *node* is a failure domain: on a real cluster one machine (its ``/dev/shm``), on one
machine a group of ``ranks_per_node`` consecutive ranks standing in for one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REDUNDANCY = ("mirror", "parity")


def node_of(rank: int, ranks_per_node: int) -> int:
    return rank // ranks_per_node


def num_nodes(world_size: int, ranks_per_node: int) -> int:
    return -(-world_size // ranks_per_node)


def leaders(world_size: int, ranks_per_node: int) -> dict[int, int]:
    """node -> the rank that speaks for it (its first rank)."""
    return {n: n * ranks_per_node for n in range(num_nodes(world_size, ranks_per_node))}


def mirror_of(rank: int, world_size: int, ranks_per_node: int) -> int:
    """The rank holding ``rank``'s mirror: same place on the next node (wrapping)."""
    return (rank + ranks_per_node) % world_size


def parity_groups(world_size: int, ranks_per_node: int, group_size: int) -> list[list[int]]:
    """Groups of ``group_size`` ranks, each on a distinct node: nodes are cut into runs of
    ``group_size`` consecutive nodes, and the ranks at the same place in a run's nodes
    form one group."""
    nodes = num_nodes(world_size, ranks_per_node)
    groups = []
    for first in range(0, nodes, group_size):
        for local in range(ranks_per_node):
            g = [(first + i) * ranks_per_node + local for i in range(group_size)]
            g = [r for r in g if r < world_size]
            if g:
                groups.append(g)
    return groups


def group_of(rank: int, groups: list[list[int]]) -> list[int]:
    for g in groups:
        if rank in g:
            return g
    raise ValueError(f"rank {rank} is in no parity group")


def segment_index(members: list[int], owner: int, holder: int) -> int:
    """Which of ``owner``'s n-1 equal segments goes into ``holder``'s parity block:
    the holder's position among the owner's peers."""
    peers = [m for m in members if m != owner]
    return peers.index(holder)


def padded_length(sizes: list[int], n: int) -> tuple[int, int]:
    """(L, s): every member's data padded to L bytes, cut into n-1 segments of s bytes
    (s a multiple of 8, so XOR runs on int64 words)."""
    longest = max(sizes) if sizes else 0
    per = max(1, n - 1)
    s = -(-longest // per)
    s = -(-s // 8) * 8 or 8
    return s * per, s


# ---------------------------------------------------------------------- recovery planning


@dataclass
class RecoveryPlan:
    """How to rebuild one step on every live node.

    ``fetch[node]`` maps each data file that node lacks to the node sending it;
    ``blocks[node]`` maps each parity holder (old rank) whose block that node needs to
    the node sending it; ``rebuild`` maps each lost old rank to its group's members, the
    files it wrote with their sizes, L and s; ``local[node]`` maps each file the node
    already holds intact to the piece (old rank) holding it.
    """

    step: int
    world_size: int
    fetch: dict[int, dict[str, int]] = field(default_factory=dict)
    blocks: dict[int, dict[int, int]] = field(default_factory=dict)
    rebuild: dict[int, dict] = field(default_factory=dict)
    local: dict[int, dict[str, int]] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # every data file of the step: size
    digest: str = ""  # the manifest's xxh3-64
    skipped: list[str] = field(default_factory=list)  # why newer steps could not be used
    bad_copies: list[str] = field(default_factory=list)  # copies found damaged and not used


def plan_recovery(inventories: dict[int, dict]) -> RecoveryPlan | list[str]:
    """The newest step every file of which is held intact, or rebuildable, somewhere.

    ``inventories`` maps each live node to what it holds (:func:`outlast.memtier.store.inventory`)::

        {step: {"manifests": {digest: ({rel: size}, world_size)},
                "pieces": {old_rank: {"files": {rel: size}, "bad": {rel: why}, "digest": d}},
                "parity": {holder: {"members": [...], "sizes": {rank: {rel: size}},
                                    "L": int, "s": int, "digest": d}}}}

    A node lists only pieces committed there (a torn snapshot left none) whose manifest
    is intact; pieces whose manifest differs from the step's majority are ignored.

    Returns the plan, or (when no step can be recovered) one line per step saying why.
    """
    steps = sorted({s for inv in inventories.values() for s in inv}, reverse=True)
    why: list[str] = []
    for step in steps:
        got = _plan_step(step, inventories)
        if isinstance(got, RecoveryPlan):
            got.skipped = why
            return got
        why.append(got)
    return why


def _plan_step(step: int, inventories: dict[int, dict]) -> RecoveryPlan | str:
    views = {n: inv[step] for n, inv in inventories.items() if step in inv}
    votes: dict[str, int] = {}
    for v in views.values():
        for p in list(v["pieces"].values()) + list(v["parity"].values()):
            votes[p["digest"]] = votes.get(p["digest"], 0) + 1
    if not votes:
        return f"step {step}: no intact manifest copy in memory"
    digest = max(votes, key=lambda d: (votes[d], d))
    files, world = next(v["manifests"][digest] for v in views.values() if digest in v["manifests"])
    holders: dict[str, list[int]] = {}  # rel -> nodes with an intact copy
    owner: dict[str, int] = {}
    bad: list[str] = []
    have: dict[int, dict[str, int]] = {n: {} for n in inventories}
    parity: dict[int, tuple[int, dict]] = {}  # holder rank -> (node, meta)
    for n in sorted(views):
        for q, piece in sorted(views[n]["pieces"].items()):
            if piece["digest"] != digest:
                continue
            for rel in piece["files"]:
                owner[rel] = q
                why = piece["bad"].get(rel)
                if why:
                    bad.append(f"step {step}: the copy of {rel} (rank {q}'s shard) on node {n} is damaged ({why}); not used")
                elif rel not in have[n]:
                    have[n][rel] = q
                    holders.setdefault(rel, []).append(n)
        for j, meta in sorted(views[n]["parity"].items()):
            if meta["digest"] == digest:
                parity.setdefault(j, (n, meta))
                for q, fs in meta["sizes"].items():
                    for rel in fs:
                        owner.setdefault(rel, q)
    missing = sorted(rel for rel in files if rel not in holders)
    plan = RecoveryPlan(step, world)
    plan.bad_copies = bad
    lost_ranks = sorted({owner.get(rel, -1) for rel in missing})
    for k in lost_ranks:
        if k < 0:
            return f"step {step}: {missing[0]} has no intact copy in memory and no parity block covers it"
        group = next((meta for _, meta in parity.values() if k in meta["members"]), None)
        if group is None:
            rel = next(r for r in missing if owner.get(r) == k)
            return (f"step {step}: rank {k}'s shard {rel} has no intact copy in memory "
                    "(its own copy and its mirror are missing or damaged)")
        members = group["members"]
        others_lost = [m for m in members if m != k and m in lost_ranks]
        if others_lost:
            return (f"step {step}: ranks {k} and {others_lost[0]} of parity group {members} are both "
                    "lost; parity rebuilds only one member of a group")
        absent = [j for j in members if j != k and j not in parity]
        if absent:
            return f"step {step}: rank {k}'s shard is lost and the parity block held by rank {absent[0]} is missing too"
        plan.rebuild[k] = {"members": members, "files": dict(group["sizes"][k]), "sizes": dict(group["sizes"]),
                          "L": group["L"], "s": group["s"]}
    # Who sends what: each node gets every file it lacks from a holder, spreading the load.
    load: dict[int, int] = {n: 0 for n in inventories}
    for n in sorted(inventories):
        plan.local[n] = have[n]
        plan.fetch[n] = {}
        for rel in sorted(files):
            if rel in have[n] or rel not in holders:
                continue
            src = min(holders[rel], key=lambda h: (load[h], h))
            load[src] += files[rel]
            plan.fetch[n][rel] = src
        plan.blocks[n] = {j: parity[j][0] for k, g in plan.rebuild.items() for j in g["members"] if j != k}
    plan.files = dict(files)
    plan.digest = digest
    return plan
