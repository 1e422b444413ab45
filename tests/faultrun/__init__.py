"""The fault run: writers and persistent subscribers, in this process and in others, work
through `tests.faultproxy` while a seeded scheduler injects network faults, PostgreSQL
restarts, process kills and pool exhaustion; a checker then reads the database and the
logs and says whether anything was lost, half-written or reordered (with figures).

* `tests.faultrun.harness`: the run (cluster, proxy, processes, scheduler, quiescing);
* `tests.faultrun.writer`: the writer tasks (and the writer process);
* `tests.faultrun.subscriber`: the subscriber process;
* `tests.faultrun.checker`: the checks and the figures;
* `tests.faultrun.records`: the logs' formats, shared by all of them.

``python -m tests.faultrun --duration 180 --seed 7`` (``invoke faults``) runs one;
``tests/test_faultrun.py`` runs short ones in the suite.
"""
