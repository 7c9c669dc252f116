"""Who a VMM runs as, and the wrappers that put it in its network namespace and drop root.

The daemon needs root for what it sets up around a VMM (namespaces, TAPs, cgroups); the VMM
itself needs none of it, so it runs as an unprivileged user (setting `vmm_user`, by default the
system user `metald-vmm`), with no supplementary groups but the one that may open /dev/kvm when
the VM uses KVM.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import stat
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

KVM_DEVICE = "/dev/kvm"


@dataclass(frozen=True)
class VmmUser:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups

    def with_group(self, gid: int | None) -> VmmUser:
        return self if gid is None or gid in self.groups else VmmUser(self.uid, self.gid, (*self.groups, gid))


@functools.cache
def resolve_vmm_user(name: str, uid: int | None = None, gid: int | None = None) -> VmmUser | None:
    """The user VMMs run as: an explicit uid (with gid, default its primary group) wins over the
    user `name`; "" means the daemon's own user (None). A user that does not exist is a
    configuration error the daemon survives: it warns loudly and runs VMMs as itself."""
    if uid is not None:
        if gid is None:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
        return VmmUser(uid, gid)
    if not name:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        log.warning(
            "VMM user %r does not exist: VMMs run UNSANDBOXED as the daemon's own user (uid %d). "
            "Create it (scripts/setup.sh: useradd --system --no-create-home --shell /usr/sbin/nologin %s) "
            'or set vmm_user = "" to accept this.',
            name,
            os.getuid(),
            name,
        )
        return None
    return VmmUser(entry.pw_uid, entry.pw_gid if gid is None else gid)


def kvm_group(device: str = KVM_DEVICE) -> int | None:
    """The group whose members may open `device` read-write; None if only its owner may."""
    try:
        st = os.stat(device)
    except OSError:
        return None
    rw = stat.S_IRGRP | stat.S_IWGRP
    return st.st_gid if st.st_mode & rw == rw else None


def wrap_argv(
    argv: Sequence[str], *, netns: str | None, user: VmmUser | None, pdeathsig: bool = False
) -> list[str]:
    """Run `argv` in network namespace `netns` and as `user`; each wrapper execs, keeping the pid.

    setpriv (re-)arms the parent-death signal, which a change of credentials clears; with
    `pdeathsig` it is used for that alone when there is no user to switch to.
    """
    out: list[str] = []
    if netns:
        out += ["ip", "netns", "exec", netns]
    if user is not None:
        groups = ",".join(map(str, user.groups))
        out += ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}"]
        out += [f"--groups={groups}" if groups else "--clear-groups", "--no-new-privs"]
    elif pdeathsig:
        out.append("setpriv")
    if user is not None or pdeathsig:
        out += ["--pdeathsig=KILL", "--"]
    return out + list(argv)
