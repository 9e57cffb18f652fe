"""The sandbox: untrusted code (graders, environments) run outside the caller's process.

A warm runner (runner.py) starts under `unshare` in fresh network, pid and mount namespaces
(namespaces.py), pivots into a minimal read-only root (root.py), becomes nobody without
capabilities (privileges.py) and builds its target from a factory named in its spec
(target.py: `"package.module:function"`, imported inside the sandbox), so this package imports
neither reward_workers nor rollout_workers. Two modes:
- grade: one forked child per call (children.py); the trusted client is reward_workers/sandbox.py;
- session: one forked child per episode that keeps its object alive between calls (episodes.py
  inside, session.py the trusted, thread-safe client `SessionSandbox`).
runner_process.py starts and talks to a runner; redaction.py cuts known secrets out of results.

Nothing is imported here: the runner and the code it hosts import single modules of this
package inside the sandbox, standard library only.
"""
