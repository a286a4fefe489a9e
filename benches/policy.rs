//! Policy engine benchmark (`cargo bench --bench policy`): decisions per second and
//! nanoseconds per decision over a real path list (`~/.cargo/registry/src`, else 50,000
//! synthetic paths), for the `agent-safe` preset, for a generated 200-rule policy, and for
//! both with an admin floor. Plain `Instant` timing, no harness.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use agentfense::policy::{Level, Policy, Preset, Rule, RuleType};

const MAX_PATHS: usize = 200_000;

/// A small deterministic generator (no dependency).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn walk(root: &Path, out: &mut Vec<(String, bool)>) {
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if out.len() >= MAX_PATHS {
                return;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let path = format!("{rel}/{name}");
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            out.push((path.clone(), is_dir));
            if is_dir {
                stack.push((e.path(), path));
            }
        }
    }
}

fn synthetic(n: usize) -> Vec<(String, bool)> {
    let names = [
        "src",
        "lib",
        "tests",
        "docs",
        "secrets",
        ".git",
        "output",
        "tmp",
        "node_modules",
        "pkg",
        "internal",
        "vendor",
    ];
    let files = [
        "main.rs",
        "lib.rs",
        "mod.rs",
        "README.md",
        "a.py",
        "test_a.py",
        ".env",
        "id.key",
        "cert.pem",
        "Cargo.toml",
        "x.json",
        "credentials.json",
    ];
    let mut rng = Lcg(42);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let depth = 1 + rng.below(7);
        let mut p = String::new();
        for _ in 0..depth {
            p.push('/');
            p.push_str(names[rng.below(names.len())]);
            if rng.below(3) == 0 {
                p.push_str(&rng.below(100).to_string());
            }
        }
        out.push((p.clone(), true));
        p.push('/');
        p.push_str(files[rng.below(files.len())]);
        out.push((p, false));
    }
    out.truncate(n);
    out
}

fn generated_policy(paths: &[(String, bool)], n: usize) -> Vec<Rule> {
    let exts = [
        "rs", "toml", "md", "json", "txt", "c", "h", "py", "js", "ts", "yml", "lock", "sh", "html",
        "css", "go",
    ];
    let levels = [Level::None, Level::View, Level::Read, Level::Write];
    let mut rng = Lcg(7);
    let mut rules = vec![Rule::glob("**/*", Level::Read)];
    while rules.len() < n {
        let (path, is_dir) = &paths[rng.below(paths.len())];
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let level = levels[rng.below(levels.len())];
        let prio = rng.below(100) as i64;
        let last = segs.last().copied().unwrap_or("x");
        let escaped = |s: &str| s.replace(['*', '?', '[', ']', '{', '}', '\\'], "_");
        let rule = match rng.below(9) {
            0 => Rule::glob(format!("**/*.{}", exts[rng.below(exts.len())]), level),
            1 if segs.len() >= 2 => Rule::glob(
                format!("/{}/{}/**", escaped(segs[0]), escaped(segs[1])),
                level,
            ),
            2 if segs.len() >= 2 => Rule::glob(format!("**/{}", escaped(last)), level),
            3 => Rule::new(path.clone(), level, RuleType::File, 0),
            4 if *is_dir => Rule::new(path.clone(), level, RuleType::Directory, 0),
            // Not the first segment: a rule over the whole tree would decide everything.
            5 if segs.len() >= 2 => Rule::glob(
                format!("**/{}/**", escaped(segs[1 + rng.below(segs.len() - 1)])),
                level,
            ),
            6 => Rule::glob(
                format!("**/{}*", escaped(&last.chars().take(3).collect::<String>())),
                level,
            ),
            7 if !segs.is_empty() => Rule::glob(
                format!(
                    "/{}/*/src/**/*.{}",
                    escaped(segs[0]),
                    exts[rng.below(exts.len())]
                ),
                level,
            ),
            8 => Rule::glob(
                format!("**/test*/**/*.{}", exts[rng.below(exts.len())]),
                level,
            ),
            _ => continue,
        };
        rules.push(rule.with_priority(prio));
    }
    rules
}

fn bench(name: &str, policy: &Policy, paths: &[(String, bool)]) {
    // AGENTFENSE_BENCH_ONLY: run only the cases whose name contains this.
    if std::env::var("AGENTFENSE_BENCH_ONLY").is_ok_and(|only| !name.contains(&only)) {
        return;
    }
    // Warm up (and count levels, so the work cannot be optimised away).
    let mut counts = [0usize; 5];
    for (p, d) in paths {
        let dec = policy.decide(p, *d);
        counts[if dec.traversable {
            4
        } else {
            dec.level as usize
        }] += 1;
    }
    // AGENTFENSE_BENCH_SECS: how long to time each case (default 2 s; 0 = one round, e.g.
    // under valgrind).
    let secs: f64 = std::env::var("AGENTFENSE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let min_rounds = if secs > 0.0 { 2 } else { 1 };
    let mut rounds = 0usize;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs_f64(secs) || rounds < min_rounds {
        for (p, d) in paths {
            black_box(policy.decide(black_box(p), *d));
        }
        rounds += 1;
    }
    let elapsed = start.elapsed();
    let n = (rounds * paths.len()) as f64;
    let ns = elapsed.as_nanos() as f64 / n;
    println!(
        "{name:<40} {:>6} rules  {:>12.0} decisions/s  {:>8.1} ns/decision   (none {}, view {}, read {}, write {}, traversable {})",
        policy.rules().len(),
        1e9 / ns,
        ns,
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        counts[4]
    );
}

fn main() {
    let mut paths = Vec::new();
    // AGENTFENSE_BENCH_PATHS=FILE: the path list (one per line, directories ending in `/`),
    // for runs to compare.
    if let Some(text) =
        std::env::var_os("AGENTFENSE_BENCH_PATHS").and_then(|f| std::fs::read_to_string(f).ok())
    {
        paths = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| match l.strip_suffix('/') {
                Some(d) => (d.to_string(), true),
                None => (l.to_string(), false),
            })
            .collect();
        println!("paths: {} from AGENTFENSE_BENCH_PATHS", paths.len());
    }
    let registry = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/registry/src"));
    if let Some(r) = registry.filter(|r| paths.is_empty() && r.is_dir()) {
        walk(&r, &mut paths);
        println!("paths: {} from {}", paths.len(), r.display());
    }
    if paths.len() < 10_000 {
        paths = synthetic(50_000);
        println!("paths: {} synthetic", paths.len());
    }
    let depth: usize = paths.iter().map(|(p, _)| p.matches('/').count()).sum();
    println!(
        "mean depth: {:.1} segments",
        depth as f64 / paths.len() as f64
    );

    let floor = vec![
        Rule::glob("**/.ssh/**", Level::None).with_priority(100),
        Rule::glob("**/*.pem", Level::None).with_priority(100),
        Rule::glob("/etc/**", Level::Read),
    ];
    let agent_safe = match Policy::preset(Preset::AgentSafe) {
        Ok(p) => p,
        Err(e) => return eprintln!("{e}"),
    };
    bench("agent-safe", &agent_safe, &paths);
    match agent_safe.clone().with_floor(&floor) {
        Ok(p) => bench("agent-safe + 3-rule floor", &p, &paths),
        Err(e) => eprintln!("{e}"),
    }

    let rules = generated_policy(&paths, 200);
    let t = Instant::now();
    let generated = match Policy::new(rules, Level::None) {
        Ok(p) => p,
        Err(e) => return eprintln!("{e}"),
    };
    println!(
        "compile 200 rules: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    bench("generated 200 rules", &generated, &paths);
    match generated.clone().with_floor(&floor) {
        Ok(p) => bench("generated 200 rules + 3-rule floor", &p, &paths),
        Err(e) => eprintln!("{e}"),
    }
    let unnormalised: Vec<(String, bool)> = paths
        .iter()
        .take(50_000)
        .map(|(p, d)| (format!("{}/", &p[1..]), *d))
        .collect();
    bench(
        "agent-safe, paths needing normalisation",
        &agent_safe,
        &unnormalised,
    );

    let t = Instant::now();
    let n = 2_000.min(paths.len());
    for (p, _) in paths.iter().take(n) {
        black_box(generated.explain(p));
    }
    println!(
        "explain (generated 200 rules): {:.1} µs/path",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}
