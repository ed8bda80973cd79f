"""The privacy ledger: client-level (epsilon, delta) of the global models a DP run released, and how a resumed run
continues it.

A round's release is counted when its model is taken, before anything of it leaves the server (site validation,
``last.pt``), and the account is written to the run folder then (:data:`PrivacyLedger.FILE`): the server's own
state (:class:`server.state.ServerCheckpoint`, which carries the account too) is written only at the round's end,
after the sites have had the model. A server stopped in between resumes with that release counted
(:func:`resumed_account`); the round then runs again, a second release with fresh noise, counted as well.

The account is also written outside the run folder, to ``<work-dir>/privacy/<state key>.json`` (the server's home:
``work-dir``, else ``$MSTKD_HOME``, else ``~/.mstkd``). A run folder restored from an older copy counts fewer
releases than the sites have had; resumed on the same server, the run continues the larger account. Resumed twice
from copies of one run, it counts both resumptions' releases.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mstkd.atomic import check_writable, write_text
from mstkd.errors import InputError
from mstkd.numbers import is_whole
from mstkd.runconfig import check_state_key
from server.replies import printable

log = logging.getLogger("mstkd.server")

MAX_ACCOUNT_BYTES = 1 << 20
"""The largest account file read (one is a few kB)."""


class PrivacyLedger:
    """Client-level (epsilon, delta) of the released global models, from Flower's RDP accountant.

    Each round that aggregates releases one Gaussian mechanism over the sampled sites (noise
    multiplier ``dp-noise`` on updates clipped to the round's norm, summed and divided by ``min-nodes``
    whoever replies; with adaptive clipping, that multiplier covers the update noise and the clipped-count
    noise together). No amplification by sampling is claimed, and the count is the conservative one. Without
    amplification epsilon does not depend on the population, so a resumed account is kept whatever number of
    nodes is connected now.

    With ``folder``, every release writes the account to ``folder``'s :data:`FILE`, with the run's ``key`` (the
    nodes' state key, which a run keeps on resume and a new run in the same folder does not share); with ``home``,
    to :func:`home_file` as well.
    """

    FILE = "privacy.json"

    def __init__(
        self,
        privacy: dict,
        population: int,
        state: dict | None = None,
        *,
        folder: Path | None = None,
        key: str = "",
        home: Path | None = None,
    ) -> None:
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        self.noise = float(privacy["noise_multiplier"])
        self.key = key
        self.files = [Path(folder) / self.FILE] if folder is not None else []
        self.files += [home_file(home, key)] if home is not None else []
        self.accountant = None
        self.spent: dict[int, dict] = {}  # what each round's release brought the account to, for its record
        if self.noise <= 0:
            return
        if home is not None:
            prepare_home(self.files[-1])
        config = PrivacyConfig(
            target_delta=float(privacy["delta"]),
            population_size=max(population, int(privacy["sampled_nodes"])),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=privacy["max_epsilon"],
        )
        self.accountant = RdpAccountant(config)
        self.event = GaussianPrivacyEvent(
            noise_multiplier=self.noise,
            sample_size=int(privacy["sampled_nodes"]),
            population_size=config.population_size,
        )
        if state is not None and not state:  # resumed from a run whose rounds kept no account: it had no noise
            raise InputError(
                "resume-from: its rounds were released without privacy accounting (dp off, or dp-noise 0); "
                "a run with dp-noise resumes only from a run that had it"
            )
        if state:
            try:
                self.accountant.load_state_dict(_for_population(state, config.population_size, config.max_epsilon))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # another delta, or a broken file
                raise InputError(
                    "resume-from: its privacy account was kept for another dp-delta, or does not read "
                    f"({printable(exc, 120)})"
                ) from None

    def stop_reason(self) -> str | None:
        """Why the next round must not run (its release would exceed ``dp-max-epsilon``), or None."""
        if self.accountant is None or self.accountant.config.max_epsilon is None:
            return None
        if self.accountant.would_exceed(self.event):
            spent = self.accountant.get_privacy_spent()
            return (
                f"the next round would exceed dp-max-epsilon {self.accountant.config.max_epsilon:g} "
                f"(spent: epsilon {spent.epsilon:.3f} at delta {spent.delta:g})"
            )
        return None

    def release(self, server_round: int) -> None:
        """Count the round's new global model before it leaves the server, and write the account first (with a
        ``folder``); what the account came to is kept in :attr:`spent` for the round's record."""
        if self.accountant is not None:
            self.accountant.compose(self.event)
            record = json.dumps({"round": server_round, "key": self.key, "account": self.state()})
            for path in self.files:
                write_text(path, record)
        self.spent[server_round] = self.so_far()

    def so_far(self) -> dict:
        """The budget spent so far, as a round's record carries it."""
        if self.accountant is None:
            return {"epsilon": None, "epsilon_note": "no noise: no finite epsilon"}
        spent = self.accountant.get_privacy_spent()
        return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}

    def state(self) -> dict:
        return self.accountant.state_dict() if self.accountant is not None else {}


def _for_population(state: dict, population: int, max_epsilon: float | None) -> dict:
    """``state`` with this run's population and ``dp-max-epsilon``: neither is part of the account (no amplification
    is claimed, and the limit is a stopping rule, which a resumed run may raise)."""
    config = {**state["config"], "population_size": population, "max_epsilon": max_epsilon}
    compositions = [
        {**entry, "event": {**entry["event"], "population_size": population}} for entry in state["compositions"]
    ]
    return {**state, "config": config, "compositions": compositions}


def _releases(account: dict) -> int:
    return sum(int(entry["count"]) for entry in account.get("compositions", ()))


def home_file(home: Path, key: str) -> Path:
    """Where a server whose home is ``home`` keeps the account of the run with state key ``key``, outside its run
    folder (``home`` made absolute: a relative ``work-dir`` would name another folder from another directory)."""
    return Path(home).expanduser().resolve() / "privacy" / f"{check_state_key(key)}.json"


def prepare_home(path: Path) -> None:
    """Make the folder of ``path`` (a :func:`home_file`) ready, private to this user, before any round.

    Raises:
        InputError: it cannot be written, is a link, or others may write to it (and so replace the account).
    """
    folder = path.parent
    check_writable(folder, what="work-dir: the server's copy of the privacy account,")
    if folder.is_symlink():
        raise InputError(f"work-dir: {folder} is a link; the server keeps its privacy accounts in a folder of its own")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (mode := folder.stat().st_mode) & 0o022:
        raise InputError(
            f"work-dir: others may write to {folder} (mode {mode & 0o777:o}), where the server keeps its privacy "
            "accounts; make it private (chmod 700)"
        )


def resumed_account(privacy: dict, folder: Path, checkpoint, home: Path | None = None) -> dict:
    """The privacy account a resumed run continues, the one that counts the most releases of: its server state's
    (``checkpoint.privacy``, as of its round); ``folder``'s :data:`PrivacyLedger.FILE` and, with ``home``, the
    server's own copy (:func:`home_file`), where either holds a later release of the same run (its state key). The
    others must each be a beginning of it; a missing copy in ``home`` is a warning (a run folder restored from an
    older copy then resumes with fewer releases than the sites have had).

    Raises:
        InputError: the run released its models with differential privacy and ``privacy`` is off or has no noise
            (its rounds would then release models without noise while the report still showed the old epsilon),
            an account file does not read, or two accounts each count releases the other does not.
    """
    if checkpoint.privacy:
        try:
            _check_account(checkpoint.privacy)
        except ValueError as exc:
            raise InputError(f"resume-from: its server state's privacy account does not read ({exc})") from None
    files = [Path(folder) / PrivacyLedger.FILE] + ([home_file(home, checkpoint.state_key)] if home else [])
    accounts = {"the server's state": checkpoint.privacy} | {str(f): _written_account(f, checkpoint) for f in files}
    accounts = {where: account for where, account in accounts.items() if account}
    if not privacy and (accounts or any("privacy" in rec for rec in checkpoint.records.values())):
        raise InputError(
            "resume-from: its rounds were released with differential privacy; resume it with the same dp settings "
            "(dp='off' would release models without clipping or noise under the old epsilon)"
        )
    if privacy and accounts and not privacy["noise_multiplier"]:
        raise InputError(
            "resume-from: its rounds were released with dp-noise > 0; resuming with dp-noise 0 would release models "
            "without noise under an account that no longer grows"
        )
    if not accounts:
        return {}
    chosen = max(accounts, key=lambda where: _releases(accounts[where]))
    for where, account in accounts.items():
        if not _extends(accounts[chosen], account):
            raise InputError(
                f"resume-from: the privacy accounts in {where} and {chosen} each count releases the other does not "
                "(the run was resumed elsewhere too, or with other dp settings): the releases of both were made; "
                "resume where both are counted"
            )
    if home and privacy["noise_multiplier"] and not files[-1].is_file():
        log.warning(
            "resume-from: this server kept no copy of the run's privacy account (%s): if the run folder was restored "
            "from an older copy, the releases made after it are not counted",
            files[-1],
        )
    return accounts[chosen]


def _check_account(account: object) -> None:
    """Raise ``ValueError`` unless ``account`` has the accountant's list of releases, each with a whole count."""
    if not isinstance(account, dict) or not isinstance(account.get("compositions"), list):
        raise ValueError("not an account")
    for entry in account["compositions"]:
        if not isinstance(entry, dict) or not is_whole(entry.get("count")) or entry["count"] < 0:
            raise ValueError("a count of releases that is not a whole number")
        if not isinstance(entry.get("event"), dict) or not {"noise_multiplier", "sample_size"} <= entry["event"].keys():
            raise ValueError("a release that does not say its noise")


def _history(account: dict) -> list[tuple]:
    """The releases of ``account`` in order: (noise multiplier, sites summed, count) each."""
    return [(e["event"]["noise_multiplier"], e["event"]["sample_size"], e["count"]) for e in account["compositions"]]


def _extends(account: dict, earlier: dict) -> bool:
    """Whether ``account`` counts every release of ``earlier``, in order, and then perhaps more."""
    before = _history(earlier)
    return _history(account)[: len(before)] == before


def _written_account(path: Path, checkpoint) -> dict:
    """The account in ``path`` when it is this run's (the checkpoint's state key) and counts more releases than the
    checkpoint's; else ``{}``. Its round is not compared: a copy of the run resumed from an earlier round has written
    a lower round, and counted every release before it.

    Raises:
        InputError: the file does not read as an account (naming it: the server's copy lies outside the run folder).
    """
    try:
        if not path.is_file():
            return {}
        if (size := path.stat().st_size) > MAX_ACCOUNT_BYTES:
            raise ValueError(f"{size} bytes")
        written = json.loads(path.read_text(encoding="utf-8"))
        account = written["account"]
        if not is_whole(written["round"]):
            raise ValueError("not the round of a release")
        _check_account(account)
        ours = written["key"] == checkpoint.state_key
        later = ours and _releases(account) > _releases(checkpoint.privacy)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise InputError(f"resume-from: {path} does not read ({printable(exc, 120)})") from None
    return account if later else {}
