"""`--task-user`: tasks run as another OS user, so they cannot read what the agent holds.

The agent (root) starts each attempt's wrapper as itself, so the attempt's records
(run.json, stop.json, exit.json, output.log) stay root's; only the task's own command drops
to the task user, through `setpriv` (util-linux) with no supplementary groups. The task
works in `<attempt>/work`, a folder it owns; the folders above it are 0711 (enter, never
list), every file the agent keeps is 0600, the node's TLS folder and key files are
unreachable, and the data dir holds nothing else it may read.
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from lepton.common.errors import FailedPrecondition

WORK_DIR = "work"
SEARCH_ONLY = 0o711  # others may pass through to the task's folder, never list or read


@dataclass(frozen=True)
class TaskUser:
    name: str
    uid: int
    gid: int
    home: str
    setpriv: str

    @classmethod
    def resolve(cls, name: str) -> TaskUser:
        """Raises FailedPrecondition (one line): unknown user, agent not root, no setpriv."""
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise FailedPrecondition(f"--task-user {name}: no such user on this machine") from None
        if os.geteuid() != 0:
            raise FailedPrecondition(f"--task-user {name}: the agent must run as root to start tasks as another user")
        if pw.pw_uid == 0:
            raise FailedPrecondition(f"--task-user {name}: tasks must not run as root")
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise FailedPrecondition(f"--task-user {name}: setpriv (util-linux) is not installed")
        return cls(name, pw.pw_uid, pw.pw_gid, pw.pw_dir, setpriv)

    def check_reachable(self, data_dir: Path) -> None:
        """Tasks use absolute paths into the data dir (their folder, the task TLS folder):
        every folder above it must let the task user pass. Raises FailedPrecondition."""
        for folder in Path(os.path.abspath(data_dir)).parents:
            st = folder.stat()
            if not (st.st_mode & 0o001 or (st.st_uid == self.uid and st.st_mode & 0o100)
                    or (st.st_gid == self.gid and st.st_mode & 0o010)):
                raise FailedPrecondition(
                    f"--task-user {self.name}: {self.name} cannot pass through {folder} "
                    f"(mode {st.st_mode & 0o7777:04o}) to the data dir: chmod o+x it, move the data dir, "
                    "or run tasks as the agent's user with --task-user none")

    def argv_prefix(self) -> tuple[str, ...]:
        """What runs the task's command as this user: no groups of the agent's, no root."""
        return (self.setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--")

    def workdir(self, att_dir: Path) -> Path:
        """Make the attempt's folders passable and `<att_dir>/work` the task's own; returns it.
        Raises OSError."""
        for folder in (att_dir.parent.parent, att_dir.parent, att_dir):
            os.chmod(folder, SEARCH_ONLY)
        work = att_dir / WORK_DIR
        work.mkdir(mode=0o700, exist_ok=True)
        os.chown(work, self.uid, self.gid)
        return work

    def give_folder(self, folder: Path) -> None:
        """Make `folder` (in a folder of the data dir) this user's, with everything in it
        (written there before under another owner), and let it pass the folder above.
        Raises OSError."""
        os.chmod(folder.parent, SEARCH_ONLY)
        if folder.stat().st_uid != self.uid:
            for top, dirs, files in os.walk(folder):
                for name in (*dirs, *files):
                    os.lchown(os.path.join(top, name), self.uid, self.gid)
        os.chown(folder, self.uid, self.gid)
        os.chmod(folder, 0o700)

    def env(self, work: Path) -> dict[str, str]:
        home = self.home if os.path.isdir(self.home) else str(work)  # nobody's is /nonexistent
        return {"HOME": home, "USER": self.name, "LOGNAME": self.name}
