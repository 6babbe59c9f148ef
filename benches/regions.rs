//! Regions in this process (root: /dev/userfaultfd): the broker of `region::session`
//! serving a client `Region`, as a job's would, without the sandbox around it.
//! scripts/bench-regions measures the same from inside real jobs, with percentiles and
//! the eager and `cat` baselines side by side.
//!
//! - fault service per 4 KiB page: first touches two pages apart (no read-ahead), from a
//!   file region whose file is in the page cache;
//! - sequential read of 64 MiB: open and read every byte lazily (read-ahead), against
//!   copying the file into fresh memory and reading that (the eager way).

use agentd::region::broker::{Hooks, Injected, Live};
use agentd::region::content::Content;
use agentd::region::session::{self, Allowed, Broker};
use agentd::region::stats::Counters;
use agentd::region::store::RegionFiles;
use agentd::region::{Base, RegionInfo, RegionState};
use agentd_region::Region;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Quiet;
impl Hooks for Quiet {
    fn failed(&self, _: &str, _: &str, _: u64, _: &str) {}
    fn written(&self, _: &str, _: &str, _: &[(u64, Vec<u8>)]) -> Result<(), String> {
        Ok(())
    }
    fn closed(&self, _: &str, _: &str) {}
}

const SIZE: usize = 64 << 20;

fn setup(dir: &std::path::Path) -> (session::Listener, std::path::PathBuf) {
    let file = dir.join("data");
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let info = RegionInfo {
        name: "bench".into(),
        size: SIZE as u64,
        generation: 1,
        state: RegionState::Active,
        base: Base::File {
            path: file.display().to_string(),
        },
        base_inherited: false,
        layer_pages: 0,
        parent: None,
        created_ms: 0,
        published_ms: None,
        revoked_ms: None,
        owner_uid: 0,
    };
    let files = RegionFiles::new(dir);
    files.ensure().unwrap();
    let live = Arc::new(Live::new(1, false));
    let stats = Arc::new(Counters::default());
    let decide = move |_: &str, _: bool| {
        Ok(Allowed {
            live: live.clone(),
            content: Content::open(&files, &info).expect("content"),
            job_stats: stats.clone(),
            charge: None,
        })
    };
    let sock = dir.join("regions.sock");
    let listener = session::listen(
        &sock,
        Broker {
            job: "bench".into(),
            decide: Box::new(decide),
            hooks: Arc::new(Quiet),
            injected: Arc::new(Injected::default()),
            active: Default::default(),
        },
    )
    .unwrap();
    // SAFETY: set before any thread of this bench reads it.
    unsafe { std::env::set_var(agentd_region::proto::SOCKET_ENV, &sock) };
    (listener, file)
}

fn regions(c: &mut Criterion) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the region benches need root (/dev/userfaultfd)"
    );
    let dir = tempfile::tempdir().unwrap();
    let (_listener, file) = setup(dir.path());

    c.bench_function("region fault service, 4 KiB page", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let r = Region::open("bench", false).unwrap();
                let pages = (SIZE / 4096 / 2) as u64;
                let n = left.min(pages);
                let p = r.as_ptr();
                let t0 = Instant::now();
                for i in 0..n {
                    // SAFETY: within the region's mapping.
                    std::hint::black_box(unsafe {
                        std::ptr::read_volatile(p.add(i as usize * 8192))
                    });
                }
                total += t0.elapsed();
                left -= n;
            }
            total
        })
    });

    let mut g = c.benchmark_group("region sequential read, 64 MiB");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(20);
    let scan = |bytes: &[u8]| -> u64 {
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
            .fold(0u64, u64::wrapping_add)
    };
    g.bench_function("lazy (open, fault in with read-ahead, read)", |b| {
        b.iter(|| {
            let r = Region::open("bench", false).unwrap();
            std::hint::black_box(scan(r.as_slice()))
        })
    });
    g.bench_function("eager (copy the file into memory, read)", |b| {
        b.iter(|| {
            let copy = std::fs::read(&file).unwrap();
            std::hint::black_box(scan(&copy))
        })
    });
    g.finish();
}

criterion_group!(benches, regions);
criterion_main!(benches);
