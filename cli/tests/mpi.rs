//! Sharded models as MPI processes (feature `mpi`): `mpirun -np N q3c ...` on artifacts compiled with
//! `--shards N`, against the same model compiled for one process. The tolerance (1e-4) is derived in
//! `tests/tests/sharded.rs`, which runs the same ranks as threads; here the processes, the MPI transport,
//! the CLI's rank handling, the server and a hung rank are what is tested.

#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_error, ids_arg, json_ids, listening_url, ok, q3c, tiny_model};
use q3c_tests::{fixtures_dir, golden, max_abs_diff, FIXTURES};
use serde_json::{json, Value};

/// `mpirun -np ranks` with what a test machine needs: root allowed, more ranks than cores, shared memory.
fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &ranks.to_string()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_MCA_btl", "self,vader")
        .arg(env!("CARGO_BIN_EXE_q3c"));
    c
}

/// `mpirun -np ranks q3c args`, which must succeed; its stdout.
fn mpi_ok(ranks: usize, args: &[&str]) -> String {
    let out = run_bounded(mpirun(ranks).args(args), Duration::from_secs(120));
    assert!(
        out.status.success(),
        "mpirun -np {ranks} q3c {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd` to completion, killing it past `limit` (a hung job must fail the test, not stall CI).
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{cmd:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Asserts an `mpirun` job failed with `want` in its error output (which mpirun's own report surrounds) and
/// no panic.
fn assert_job_failed(out: &Output, want: &str) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(want), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Compiles `model` for `shards` ranks with f32 activations and KV cache. (With bf16 activations or a
/// half-precision cache, a sum that differs in its last bit — the ranks add in another order — can round
/// to the neighbouring bf16 or f16 value, a relative change of 2^-8 or 2^-11 that later layers carry: 4e-3
/// on the bf16 fixture, which is that rounding's bound, not sharding's.)
fn compile(model: &Path, shards: usize, out: &Path) -> PathBuf {
    compile_split(model, shards, "features", out)
}

/// Like [`compile`], MoE layers split as `--moe-split moe_split` says.
fn compile_split(model: &Path, shards: usize, moe_split: &str, out: &Path) -> PathBuf {
    let so = out.join(format!("model-{shards}-{moe_split}.so"));
    ok(&[
        "compile",
        model.to_str().unwrap(),
        "--shards",
        &shards.to_string(),
        "--moe-split",
        moe_split,
        "--activations",
        "f32",
        "--kv-dtype",
        "f32",
        "-o",
        so.to_str().unwrap(),
    ]);
    so
}

fn read_logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn every_fixture_over_2_and_4_processes_gives_the_single_process_logits_and_ids() {
    for name in FIXTURES {
        let tmp = tempfile::tempdir().unwrap();
        let dir = fixtures_dir().join(name);
        let weights = dir.to_str().unwrap();
        let g = golden(name);
        let prompt = ids_arg(&g.prompt_ids);
        let logits = |out: &Path| {
            vec![
                "logits".to_string(),
                "--prompt-ids".into(),
                prompt.clone(),
                "--weights".into(),
                weights.into(),
                "--out".into(),
                out.to_str().unwrap().into(),
            ]
        };
        let generate = |so: &Path| {
            let n = g.greedy_ids.len().to_string();
            [
                "generate",
                "--model",
                so.to_str().unwrap(),
                "--weights",
                weights,
                "--prompt-ids",
                &prompt,
                "--max-new-tokens",
                &n,
                "--json",
            ]
            .map(String::from)
        };
        let one = compile(&dir, 1, tmp.path());
        let want_path = tmp.path().join("one.safetensors");
        let mut args = logits(&want_path);
        args.extend(["--model".into(), one.to_str().unwrap().into()]);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let want = read_logits(&want_path);
        let want_ids = json_ids(&ok(&generate(&one).each_ref().map(String::as_str)));
        // The MoE fixture (8 experts) is also run expert-parallel (`tests/tests/sharded.rs` covers the
        // other MoE fixture and both backends).
        let splits: &[&str] = match name {
            "moe" => &["features", "experts"],
            _ => &["features"],
        };
        for (ranks, split) in [2, 4]
            .into_iter()
            .flat_map(|r| splits.iter().map(move |s| (r, s)))
        {
            let so = compile_split(&dir, ranks, split, tmp.path());
            let got_path = tmp.path().join(format!("{ranks}-{split}.safetensors"));
            let mut args = logits(&got_path);
            args.extend(["--model".into(), so.to_str().unwrap().into()]);
            mpi_ok(ranks, &args.iter().map(String::as_str).collect::<Vec<_>>());
            let diff = max_abs_diff(&read_logits(&got_path), &want);
            let what = format!("{name} over {ranks} processes ({split})");
            println!("{what}: max |dlogit| {diff:e}");
            assert!(diff <= 1e-4, "{what}: {diff:e}");
            let ids = json_ids(&mpi_ok(
                ranks,
                &generate(&so).each_ref().map(String::as_str),
            ));
            assert_eq!(ids, want_ids, "{what}");
        }
    }
}

#[test]
fn a_sharded_artifact_outside_mpirun_or_with_other_ranks_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures_dir().join("dense_gqa");
    let so = compile(&dir, 2, tmp.path());
    let args = [
        "generate",
        "--model",
        so.to_str().unwrap(),
        "--weights",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1,2,3",
    ];
    assert_error(
        &q3c(&args),
        "is sharded over 2 ranks: run it as `mpirun -np 2 q3c ...`",
    );
    let out = run_bounded(mpirun(4).args(args), Duration::from_secs(60));
    assert_job_failed(&out, "is sharded over 2 ranks, and mpirun started 4");
    // Not divisible: refused at compile time, naming the dimension.
    assert_error(
        &q3c(&[
            "compile",
            dir.to_str().unwrap(),
            "--shards",
            "3",
            "-o",
            "x.so",
        ]),
        "4 attention heads cannot be split over 3 ranks",
    );
    assert!(!Path::new("x.so").exists());
}

/// A server whose model runs on `ranks` processes (1: no mpirun), its URL and its process.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(so: &Path, model: &Path, ranks: usize, env: &[(&str, &str)]) -> Server {
    let mut cmd = match ranks {
        1 => Command::new(env!("CARGO_BIN_EXE_q3c")),
        n => mpirun(n),
    };
    let mut child = cmd
        .args([
            "serve",
            so.to_str().unwrap(),
            "--weights",
            model.to_str().unwrap(),
        ])
        .args(["--port", "0", "--threads", "1", "--name", "tiny"])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = listening_url(&mut child);
    Server { child, url }
}

fn complete(url: &str, prompt: &str) -> Value {
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0});
    let resp = ureq::post(&format!("{url}/v1/completions"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap();
    serde_json::from_str(&resp.into_string().unwrap()).unwrap()
}

#[test]
fn a_server_on_two_processes_answers_as_one_process_does() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let prompts = [
        "The capital of France is",
        "1, 2, 3, 4,",
        "Once upon a time",
    ];
    let one = compile(&model, 1, tmp.path());
    let want: Vec<Value> = {
        let s = serve(&one, &model, 1, &[]);
        prompts
            .iter()
            .map(|p| complete(&s.url, p)["choices"][0]["text"].clone())
            .collect()
    };
    let two = compile(&model, 2, tmp.path());
    let s = serve(&two, &model, 2, &[]);
    // Concurrent requests share the scheduler's batched steps on every rank.
    let got: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| sc.spawn(|| complete(&s.url, p)["choices"][0]["text"].clone()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(got, want);
}

/// The pid of rank `rank` of the job whose processes carry `Q3C_TEST_JOB=job` (Open MPI detaches ranks from
/// `mpirun`, so they are found by their environment: the job's marker and `OMPI_COMM_WORLD_RANK`).
fn rank_pid(job: &str, rank: usize) -> Option<u32> {
    let wanted = [
        format!("Q3C_TEST_JOB={job}"),
        format!("OMPI_COMM_WORLD_RANK={rank}"),
    ];
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid = entry
            .ok()?
            .file_name()
            .to_string_lossy()
            .parse::<u32>()
            .ok()?;
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "q3c" && wanted.iter().all(|w| vars.contains(&w.as_bytes()))).then_some(pid)
    })
}

#[test]
fn a_hung_rank_ends_the_job_with_one_error_from_rank_0() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let two = compile(&model, 2, tmp.path());
    let job = format!("hung-{}", std::process::id());
    let mut s = serve(
        &two,
        &model,
        2,
        &[("Q3C_MPI_TIMEOUT", "3"), ("Q3C_TEST_JOB", &job)],
    );
    let follower = rank_pid(&job, 1).expect("rank 1 runs");
    let st = Command::new("kill")
        .args(["-STOP", &follower.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    // The request cannot be answered; the job must end by itself, within the timeout and some slack.
    let url = s.url.clone();
    std::thread::spawn(move || {
        let _ = ureq::post(&format!("{url}/v1/completions"))
            .set("Content-Type", "application/json")
            .send_string(&json!({"prompt": "hi", "max_tokens": 4}).to_string());
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the job did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = Command::new("kill")
        .args(["-KILL", &follower.to_string()])
        .status();
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(s.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("error: rank 0: ") && stderr.contains("waited 3 s for the other ranks"),
        "{stderr}"
    );
}

/// Rank 0 failing after the others loaded (here: its port is taken) ends the job with its error, instead of
/// leaving the other ranks waiting for it.
#[test]
fn a_failing_rank_0_ends_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let two = compile(&model, 2, tmp.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = run_bounded(
        mpirun(2).args([
            "serve",
            two.to_str().unwrap(),
            "--weights",
            model.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            &port,
        ]),
        Duration::from_secs(60),
    );
    assert_job_failed(&out, "error: cannot listen on 127.0.0.1:");
}
