"""Exit statuses of megaclm's entry points, so that a batch script can tell what happened.

    0   finished: the run reached --train-iters/--train-samples/--train-tokens (or had nothing to do)
    1   failed: an error during training (a traceback, or the NaN/spike guard gave up)
    2   bad input: one `error:` line names it (megaclm.utils.errors.cli_main)
    75  hung: a rank's watchdog fired (--hang-timeout-s); stacks in <save>/hang/. Requeue: it resumes.
    76  stopped, not finished: a signal (SIGTERM/SIGUSR1, or the `deepspeed` launcher gone),
        --exit-duration-in-mins or --exit-interval stopped the run after its checkpoint was saved (a
        signal during start-up: before the first step, with no new checkpoint: none is due).
        Requeue: it resumes where it stopped.
    130 interrupted by Ctrl-C

slurm/pretrain_multinode.sbatch requeues on 75 and 76 and on nothing else.
"""
FINISHED = 0
FAILED = 1
BAD_INPUT = 2
HUNG = 75  # EX_TEMPFAIL: "try again", which is what a requeue does
STOPPED = 76
INTERRUPTED = 130
