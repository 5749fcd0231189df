"""Running a plate: the driver (plan, dispatch, collect), the per-well worker, the scheduler, reruns, progress."""
