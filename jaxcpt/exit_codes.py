"""The exit codes of ``jaxcpt`` commands, for launch scripts and schedulers that act on them.

| code | meaning | what a launcher does |
|---|---|---|
| 0 | finished (or ``--check`` passed) | nothing more to do |
| 1 | crashed (an unexpected error; a traceback is printed) | look at the log |
| 2 | a config, path or input error (one line saying what and how to fix it) | fix it; retrying repeats it |
| 3 | ``train.max_nonfinite_steps`` non-finite steps in a row | lower the learning rate / check the data |
| 4 | another host failed; this one was stopped (its message names the host and the error) | look at that host's error |
| 75 | stopped early by a signal (preemption, a SLURM time limit, Ctrl-C, a hang-up) after saving a checkpoint | run the same command again: it resumes |

75 is EX_TEMPFAIL of BSD's sysexits.h ("temporary failure; the user is invited to retry"),
distinct from every code above and from the 128+N of a process killed by signal N.
"""

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_OTHER_HOST_FAILED = 4
EXIT_STOPPED_EARLY = 75
