"""Timer functions: one on a %SETTING% schedule, one yearly (for --once, past due and the admin API)."""

import azure.functions as func
from recorder import record

app = func.FunctionApp()


@app.timer_trigger(arg_name="timer", schedule="%TICK_SCHEDULE%", use_monitor=False)
def tick(timer: func.TimerRequest) -> None:
    record(event="tick", past_due=timer.past_due)


@app.timer_trigger(arg_name="timer", schedule="0 0 0 1 1 *")
def yearly(timer: func.TimerRequest) -> None:
    record(event="yearly", past_due=timer.past_due)
