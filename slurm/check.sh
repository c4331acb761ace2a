#!/bin/bash
# `make slurm-check`: the shipped Slurm scripts on a real, one-node Slurm cluster (root on Debian/Ubuntu).
#
# Installs slurm-wlm and munge with apt-get if they are missing, then starts a private cluster: its own
# slurm.conf (SLURM_CONF), ports, state, spool and log directories, its own munge key and socket, all in a
# temporary directory. The machine's /etc/slurm and /etc/munge are neither read nor written, nor are any
# system services started or stopped. On generated data (small, with the tiny model) it runs:
#   (d) slurm/convert_array.sbatch as a 3-task array; the shards together equal a single conversion, row for row
#   (a) slurm/train.sbatch with --time=2 --signal=B:USR1@30: the warning stops the training inside an epoch
#       (the trainer's one line, no SIGKILL), the job requeues itself, resumes and ends COMPLETED, with
#       metrics.csv and last.pt (model, optimizer) equal to an uninterrupted run done directly with python;
#   (b) the same with a user's `scancel --signal=USR1 --batch` in place of the time limit;
#   (c) a finished training is not requeued: (a) and (b) end COMPLETED after as many requeues as stops, and a
#       resubmission of (a)'s finished RUN, warned just after its trainer exited 0, ends COMPLETED with no
#       requeue and the run unchanged;
#   (e) NPROC=2: two training processes under torchrun (gloo), warned by hand, requeued, COMPLETED, equal to an
#       uninterrupted 2-process torchrun run (no Slurm);
#   (f) Slurm's own stops: a plain scancel (CANCELLED, the trainer stopped at a step), a resubmission with the
#       same RUN, an external `scontrol requeue` (the script does not requeue too), COMPLETED, equal.
# Each equality checked is printed ("equal: ..."). On exit (success, failure or Ctrl-C) the jobs are cancelled,
# the daemons it started are stopped by their process ids, and the temporary directory is removed
# (KEEP=1 keeps it, for the logs). Environment: ROWS (per generated file, 2 files) [1200], EPOCHS [50] for
# (a)-(c), EPOCHS2 [8] for (e) and (f), CRED_EXPIRE [10] (Slurm's default, 120, is the real requeue hold).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
ROWS=${ROWS:-1200}
EPOCHS=${EPOCHS:-50}
EPOCHS2=${EPOCHS2:-8}
CRED_EXPIRE=${CRED_EXPIRE:-10}
START=$SECONDS
STAMP() { printf '[%4ds]' $((SECONDS - START)); }
log() { echo "slurm-check $(STAMP) $*"; }
die() { echo "slurm-check $(STAMP) FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts munged, slurmctld and slurmd)"
[ -x "$PY" ] || die "$PY not found: run make setup first"

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge (apt-get)"
    # Installing may start the distribution's own munge service (on a machine with systemd); our cluster
    # uses its own socket, key and ports, so it neither needs nor disturbs it.
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi
SLURM_VERSION=$(slurmctld -V)
log "$SLURM_VERSION, $(munged --version 2>&1 | head -n 1)"

# What the machine's configuration looked like: compared at the end.
etc_snapshot() { find /etc/slurm /etc/slurm-llnl /etc/munge -exec stat -c '%n %s %Y %a' {} + 2>/dev/null | sort || true; }
ETC_BEFORE=$(etc_snapshot)

# ---------------------------------------------------------------- the private cluster
W=$(mktemp -d /tmp/massreg-slurm-check.XXXXXX)
chmod 755 "$W"
PIDS=()          # daemons we started, in start order
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "${SLURM_CONF:-}" ] && [ -n "${CTLD_PID:-}" ] && kill -0 "$CTLD_PID" 2>/dev/null; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null)
        if [ -n "$jobs" ]; then
            log "cancelling the jobs left: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs
            local t=$((SECONDS + 60))
            while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ $SECONDS -lt $t ]; do sleep 1; done
        fi
    fi
    # Stop the daemons by pid, last started first: slurmd, slurmctld, munged.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        local pid=${PIDS[i]}
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid"
        local t=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $t ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then log "pid $pid did not stop on SIGTERM: SIGKILL"; kill -KILL "$pid"; fi
        wait "$pid" 2>/dev/null
    done
    [ ${#PIDS[@]} -gt 0 ] && log "stopped the daemons we started (pids ${PIDS[*]})"
    for pid in ${REF_PID:-} ${REF1_PID:-}; do   # the reference trainings, if a failure left them running
        if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid"; fi
    done
    if [ "${KEEP:-0}" = 1 ]; then log "kept $W"; else rm -rf "$W"; fi
    log "total $((SECONDS - START)) s; exit status $rc"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$W"/{munge,munge-key,state,spool,log,work}
chmod 700 "$W/munge-key"; chmod 755 "$W/munge"
dd if=/dev/urandom of="$W/munge-key/munge.key" bs=1024 count=1 status=none
chmod 400 "$W/munge-key/munge.key"
MUNGE_SOCKET=$W/munge/munge.sock
munged --foreground --force --socket="$MUNGE_SOCKET" --key-file="$W/munge-key/munge.key" \
    --pid-file="$W/munge/munged.pid" --log-file="$W/log/munged.log" --seed-file="$W/munge-key/munged.seed" \
    >"$W/log/munged.out" 2>&1 &
PIDS+=($!)

# Two free TCP ports for slurmctld and slurmd (not 6817/6818: a real Slurm may be running here).
read -r CTLD_PORT SLURMD_PORT < <("$PY" -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))')
HOST=$(hostname -s)
NCPU=$(nproc)
cat > "$W/slurm.conf" <<EOF
# A one-node cluster for make slurm-check (slurm/check.sh); everything it writes is under $W.
ClusterName=massregcheck
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job is held before it may start again (BeginTime = requeue + cred_expire
# + 1 s); 120 s by default, which would make every requeue cycle here take over two minutes.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd.log
PlugStackConfig=$W/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Look for runnable jobs every 5 s (60 s and 30 s by default): a requeued job starts soon after its hold.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
KillWait=30
# Keep finished jobs' records for an hour: scontrol show job is our accounting (no slurmdbd here).
MinJobAge=3600
ReturnToService=2
JobCompType=jobcomp/none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=1000 State=UNKNOWN
PartitionName=check Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
: > "$W/plugstack.conf"
export SLURM_CONF=$W/slurm.conf
slurmctld -D -f "$SLURM_CONF" >"$W/log/slurmctld.out" 2>&1 &
CTLD_PID=$!; PIDS+=("$CTLD_PID")
slurmd -D -f "$SLURM_CONF" >"$W/log/slurmd.out" 2>&1 &
PIDS+=($!)
t=$((SECONDS + 60))
until sinfo -h -o %T 2>/dev/null | grep -q idle; do
    [ $SECONDS -lt $t ] || { tail -n 20 "$W"/log/*.log; die "the cluster did not come up in 60 s"; }
    sleep 1
done
log "cluster up: $HOST, $NCPU CPUs, slurmctld :$CTLD_PORT, slurmd :$SLURMD_PORT, state in $W"

# ---------------------------------------------------------------- helpers
# A job's field from `scontrol show job` (one line per job; an array prints one per task).
job_field() { scontrol show job -o "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
FINAL='^(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE)$'
wait_end() {   # JOBID SECONDS: until the job reaches a final state
    local t=$((SECONDS + $2)) s
    while :; do
        s=$(job_field "$1" JobState)
        [[ $s =~ $FINAL ]] && return 0
        [ $SECONDS -lt $t ] || die "job $1 still $s after $2 s"
        sleep 2
    done
}
expect_completed() {   # JOBID RESTARTS-EXPECTED-or-empty
    local s r e
    s=$(job_field "$1" JobState); r=$(job_field "$1" Restarts); e=$(job_field "$1" ExitCode)
    [ "$s" = COMPLETED ] && [ "$e" = 0:0 ] || die "job $1 ended $s, ExitCode $e (expected COMPLETED 0:0)"
    [ -z "${2:-}" ] || [ "$r" = "$2" ] || die "job $1 was requeued $r times, expected $2"
    log "job $1: JobState=$s ExitCode=$e Restarts=$r"
}
wait_for_line() {   # FILE REGEX SECONDS
    local t=$((SECONDS + $3))
    until grep -qE "$2" "$1" 2>/dev/null; do
        [ $SECONDS -lt $t ] || die "no line matching '$2' in $1 after $3 s"
        sleep 0.2
    done
}
no_kill() {   # OUTPUT: the stop never degenerated into SIGKILL
    if grep -nE "forcing job termination|Killed|exit code 137|signal 9" "$1"; then
        die "$1: a training step was killed (see the lines above)"
    fi
    log "$(basename "$1"): no 'forcing job termination', no SIGKILL"
}

holds() {   # OUTPUT: from each requeue to the next start, by the script's own time stamps
    "$PY" - "$1" <<'EOF'
import re, sys
from datetime import datetime
stamp = re.compile(r"^train\.sbatch \[([0-9-]+ [0-9:]+)\]")
requeued = None
for line in open(sys.argv[1], errors="replace"):
    m = stamp.match(line)
    if not m:
        continue
    t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
    if "requeueing (RUN=" in line:
        requeued = t
    elif "): RUN=" in line and requeued is not None:
        print(f"    requeued at {requeued:%H:%M:%S}, running again at {t:%H:%M:%S}: "
              f"{(t - requeued).total_seconds():.0f} s")
        requeued = None
EOF
}
verify_job() {   # NAME JOBID REFDIR: stopped inside an epoch, requeued once per stop, COMPLETED, equal to REFDIR
    local name=$1 id=$2 ref=$3 out=$1-$2.out stops inside requeues
    stops=$(grep -cE "interrupted by SIG[A-Z0-9]+ (inside|after) epoch" "$out" || true)
    inside=$(grep -cE "interrupted by SIG[A-Z0-9]+ inside epoch" "$out" || true)
    requeues=$(grep -c "requeueing (RUN=" "$out" || true)
    log "($name) job $id: $stops stop(s) by the trainer ($inside inside an epoch), $requeues requeue(s):"
    grep -E "SIGUSR1|interrupted by|exit statuses|requeueing|training finished" "$out" | sed 's/^/    /' | cut -c1-230
    holds "$out"
    [ "$stops" -ge 1 ] || die "($name) the training was never stopped by the warning"
    [ "$inside" -ge 1 ] || die "($name) no stop inside an epoch (the warning came between epochs each time)"
    [ "$requeues" = "$stops" ] || die "($name) $stops stops but $requeues requeues"
    expect_completed "$id" "$requeues"
    grep -q "training finished: job ends COMPLETED" "$out" || die "($name) no 'training finished' line"
    no_kill "$out"
    "$PY" "$REPO/slurm/check_equal.py" runs "$ref" "runs/$name"
}

cd "$W/work"
export OMP_NUM_THREADS=1    # one thread per training process: 2 cores, up to 3 trainings at once
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- (d) conversion array
log "generating 2 x $ROWS top rows"
"$PY" -m pipeline.synth raw --process top --rows "$ROWS" --files 2 --seed 1 >/dev/null
CONV=$(RAW=raw OUT_DIR=shards NAME=top PYTHON=$PY sbatch --parsable --array=1-3 --cpus-per-task=1 \
    "$REPO/slurm/convert_array.sbatch" --cuts top --chunk-size 8)
log "(d) submitted the conversion array, job $CONV (3 tasks); a single conversion beside it"
"$PY" -m pipeline.convert raw single.h5 --cuts top --chunk-size 8 >/dev/null
t=$((SECONDS + 300))
while [ -n "$(squeue -h -j "$CONV" 2>/dev/null)" ]; do [ $SECONDS -lt $t ] || die "array $CONV not done in 300 s"; sleep 1; done
for i in 1 2 3; do
    s=$(job_field "${CONV}_$i" JobState)
    [ "$s" = COMPLETED ] || { cat "massreg-convert-${CONV}_$i.out"; die "array task $i ended $s"; }
done
log "(d) array tasks 1-3 COMPLETED; the list the last one wrote:"
sed 's/^/    /' shards/top.shards
mapfile -t SHARDS < shards/top.shards
"$PY" "$REPO/slurm/check_equal.py" shards single.h5 "${SHARDS[@]}"
rm -f single.h5

# ---------------------------------------------------------------- the uninterrupted reference
TRAIN_ARGS=("${SHARDS[@]}" --model tiny --epochs "$EPOCHS" --device cpu)
log "reference: python -m massreg.train (no Slurm, no torchrun) ${TRAIN_ARGS[*]}, in the background"
"$PY" -m massreg.train "${TRAIN_ARGS[@]}" --run-dir ref >ref.out 2>&1 &
REF_PID=$!

submit_train() {   # RUN [sbatch options...] -- prints the job id
    local run=$1; shift
    RUN=$run PYTHON=$PY sbatch --parsable --cpus-per-task=1 "$@" "$REPO/slurm/train.sbatch" "${TRAIN_ARGS[@]}"
}

# ---------------------------------------------------------------- (a) time limit, (b) user warning
A=$(submit_train runs/a --job-name=a --time=2 --signal=B:USR1@30)
B=$(submit_train runs/b --job-name=b --time=30)
log "(a) job $A: --time=2 --signal=B:USR1@30; (b) job $B: --time=30, warned by hand"
# (b): once its training is inside epoch 3 (the line for epoch 2 has appeared, then 0.5 s), warn it as a user.
wait_for_line "b-$B.out" '^epoch 2/' 300
sleep 0.5
log "(b) scancel --signal=USR1 --batch $B"
scancel --signal=USR1 --batch "$B"

wait_end "$B" 900
wait_end "$A" 1500
wait "$REF_PID" || { cat ref.out; die "the reference run failed"; }
REF_PID=
log "reference run done: $(grep -c '^epoch ' ref.out) epochs"

verify_job a "$A" ref
verify_job b "$B" ref
grep -h "time left: " "a-$A.out" | sed 's/.*time left: \(.*\)/    (a) the warning came with \1 left (asked: 0:30 before the limit)/'

# ---------------------------------------------------------------- (c) a finished training is not requeued
cp runs/a/metrics.csv a-metrics.before
sum_before=$(md5sum runs/a/last.pt | cut -d' ' -f1)
rm -f runs/a/.slurm-exit/rank*     # the job clears them too; not before it starts, though
C=$(submit_train runs/a --job-name=c --time=10)
log "(c) job $C: resubmitted with the finished RUN=runs/a; warned as soon as its trainer has exited"
wait_for_line runs/a/.slurm-exit/rank0 . 300
scancel --signal=USR1 --batch "$C" 2>/dev/null || true
wait_end "$C" 300
expect_completed "$C" 0
if grep -q "SIGUSR1" "c-$C.out"; then
    log "(c) the warning reached the script after the training had finished; it did not requeue:"
else
    log "(c) the warning came after the script had ended (the job is over; nothing to requeue):"
fi
grep -E "SIGUSR1|step exit status|training finished|requeue" "c-$C.out" | sed 's/^/    /' | cut -c1-220
grep -q '^epoch ' "c-$C.out" && die "(c) the finished run trained again"
cmp -s a-metrics.before runs/a/metrics.csv || die "(c) metrics.csv changed"
[ "$(md5sum runs/a/last.pt | cut -d' ' -f1)" = "$sum_before" ] || die "(c) last.pt changed"
log "equal: (c) runs/a/metrics.csv and last.pt unchanged (byte for byte) by the resubmission; no epoch trained"
"$PY" "$REPO/slurm/check_equal.py" runs ref runs/a >/dev/null

# ---------------------------------------------------------------- (e) two training processes, (f) Slurm's stops
TRAIN2=("${SHARDS[@]}" --model tiny --epochs "$EPOCHS2" --device cpu)
log "(e) reference: torchrun --standalone --nproc_per_node=2 -m massreg.train ${TRAIN2[*]} (gloo, no Slurm)"
log "(f) reference: python -m massreg.train ${TRAIN2[*]} (no Slurm); both in the background"
"$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m massreg.train "${TRAIN2[@]}" --run-dir ref2 \
    >ref2.out 2>&1 &
REF_PID=$!
"$PY" -m massreg.train "${TRAIN2[@]}" --run-dir ref1 >ref1.out 2>&1 &
REF1_PID=$!
E=$(RUN=runs/e NPROC=2 PYTHON=$PY sbatch --parsable --cpus-per-task=2 --job-name=e --time=30 \
    "$REPO/slurm/train.sbatch" "${TRAIN2[@]}")
log "(e) job $E: NPROC=2 --cpus-per-task=2, warned by hand inside epoch 3"
wait_for_line "e-$E.out" '^epoch 2/' 300
sleep 0.5
log "(e) scancel --signal=USR1 --batch $E"
scancel --signal=USR1 --batch "$E"
wait_end "$E" 900
wait "$REF_PID" || { cat ref2.out; die "the 2-process reference run failed"; }
REF_PID=
grep -q "exit statuses: 143 143" "e-$E.out" || die "(e) the two ranks did not both stop with 143"
verify_job e "$E" ref2

# (f) What Slurm does by itself, not guaranteed to stop at a step (srun kills the step KillWait + 2 s after
# Slurm's SIGTERM) but measured to: a plain scancel (CANCELLED; resubmitted with the same RUN it continues),
# then an external `scontrol requeue` (a preemption stand-in: Slurm requeues, the script must not).
F1=$(RUN=runs/f PYTHON=$PY sbatch --parsable --cpus-per-task=1 --job-name=f1 --time=30 \
    "$REPO/slurm/train.sbatch" "${TRAIN2[@]}")
wait_for_line "f1-$F1.out" '^epoch 2/' 300
sleep 0.5
log "(f) job $F1: plain scancel $F1 inside epoch 3"
scancel "$F1"
wait_end "$F1" 300
[ "$(job_field "$F1" JobState)" = CANCELLED ] || die "(f) job $F1 ended $(job_field "$F1" JobState), not CANCELLED"
grep -E "interrupted by|exit statuses|Slurm ended" "f1-$F1.out" | sed 's/^/    /' | cut -c1-230
grep -qE "interrupted by SIGTERM inside epoch" "f1-$F1.out" && grep -q "exit statuses: 143" "f1-$F1.out" \
    || die "(f) the plain scancel did not stop the training at a step"
log "(f) job $F1 CANCELLED, the trainer stopped at a step (exit 143); resubmitted with the same RUN=runs/f:"
F2=$(RUN=runs/f PYTHON=$PY sbatch --parsable --cpus-per-task=1 --job-name=f2 --time=30 \
    "$REPO/slurm/train.sbatch" "${TRAIN2[@]}")
wait_for_line "f2-$F2.out" '^epoch 5/' 300
sleep 0.5
log "(f) job $F2: scontrol requeue $F2 (from outside, as a preemption would) inside epoch 6"
t0=$SECONDS
scontrol requeue "$F2"
t=$((SECONDS + 120))
until [ "$(job_field "$F2" JobState)" = PENDING ]; do [ $SECONDS -lt $t ] || die "(f) job $F2 not PENDING"; sleep 0.2; done
log "(f) job $F2 PENDING $((SECONDS - t0)) s after the requeue (the script did not hold it up)"
wait_end "$F2" 600
wait "$REF1_PID" || { cat ref1.out; die "the (f) reference run failed"; }
REF1_PID=
grep -E "RUN=|interrupted by|exit statuses|Slurm ended|requeueing|training finished" "f2-$F2.out" | sed 's/^/    /' \
    | cut -c1-230
grep -q "requeueing (RUN=" "f2-$F2.out" && die "(f) the script requeued a job that Slurm was requeueing"
[ "$(grep -c "interrupted by SIGTERM inside epoch" "f2-$F2.out")" = 1 ] || die "(f) no stop at a step"
expect_completed "$F2" 1
"$PY" "$REPO/slurm/check_equal.py" runs ref1 runs/f

# ---------------------------------------------------------------- the machine as we found it
[ "$(etc_snapshot)" = "$ETC_BEFORE" ] || die "/etc/slurm or /etc/munge changed"
log "/etc/slurm, /etc/slurm-llnl and /etc/munge as found (names, sizes, times, modes)"
log "PASSED on $SLURM_VERSION in $((SECONDS - START)) s"
