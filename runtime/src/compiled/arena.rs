//! Where bound weights live: one anonymous mapping, backed by transparent huge pages where the kernel offers
//! them, that holds every weight the kernels read — copied from the checkpoint, widened, or quantized.
//!
//! Decode streams every weight once per token; with 4 KiB pages that is a TLB miss every 4 KiB (two-level in a
//! VM), with 2 MiB pages one every 2 MiB. The checkpoint's file mapping cannot get huge pages (the page cache of
//! a regular file is not collapsed for read-only data mappings), so the runtime copies by default and keeps the
//! file mapping only when asked to (`Residency::Mapped`: quicker load, no second copy in memory).

use memmap2::MmapMut;

/// How the stored bytes of weights the kernels read unchanged are bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residency {
    /// Copied into the runtime's huge-page arena (faster decode).
    #[default]
    Copied,
    /// Read in place from the memory-mapped checkpoint (quicker load, no second copy).
    Mapped,
}

/// Every weight starts on a cache line.
const ALIGN: usize = 64;

/// A fixed-size region cut into weight slots; filled once, read-only afterwards.
pub struct Arena {
    map: Option<MmapMut>,
    used: usize,
}

impl Arena {
    /// An arena for slots of the given byte sizes (each rounded up to a cache line).
    pub fn with_sizes(sizes: impl IntoIterator<Item = usize>) -> std::io::Result<Arena> {
        let total: usize = sizes.into_iter().map(|s| s.next_multiple_of(ALIGN)).sum();
        if total == 0 {
            return Ok(Arena { map: None, used: 0 });
        }
        let map = MmapMut::map_anon(total)?;
        #[cfg(target_os = "linux")]
        {
            // Advice only: without THP the pages stay 4 KiB and everything still works.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Arena {
            map: Some(map),
            used: 0,
        })
    }

    /// The next `len` bytes, zeroed. Panics if the sizes given at creation are exceeded.
    pub fn slot(&mut self, len: usize) -> &mut [u8] {
        let start = self.used;
        self.used += len.next_multiple_of(ALIGN);
        match &mut self.map {
            Some(map) => &mut map[start..start + len],
            None => {
                assert_eq!(len, 0, "arena slot beyond its sizes");
                &mut []
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_disjoint_and_sized() {
        let mut a = Arena::with_sizes([3, 64, 100]).unwrap();
        let p: Vec<(usize, usize)> = [3, 64, 100]
            .iter()
            .map(|&n| {
                let s = a.slot(n);
                s.fill(0xab);
                (s.as_ptr() as usize, s.len())
            })
            .collect();
        for (addr, _) in &p {
            assert_eq!(addr % ALIGN, 0);
        }
        assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), [3, 64, 100]);
        assert!(p[0].0 + 3 <= p[1].0 && p[1].0 + 64 <= p[2].0);
        let empty = Arena::with_sizes([]).unwrap().slot(0).len();
        assert_eq!(empty, 0);
    }
}
