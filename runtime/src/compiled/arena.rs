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
    sizes: Vec<usize>,
}

impl Arena {
    /// An arena for slots of the given byte sizes (each starting on a cache line).
    pub fn with_sizes(sizes: Vec<usize>) -> std::io::Result<Arena> {
        let total: usize = sizes.iter().map(|s| s.next_multiple_of(ALIGN)).sum();
        if total == 0 {
            return Ok(Arena { map: None, sizes });
        }
        let map = MmapMut::map_anon(total)?;
        #[cfg(target_os = "linux")]
        {
            // Advice only: without THP the pages stay 4 KiB and everything still works.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Arena {
            map: Some(map),
            sizes,
        })
    }

    /// Every byte of every slot, as filled.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Every slot, zeroed, in the order of the sizes given at creation.
    pub fn slots(&mut self) -> Vec<&mut [u8]> {
        let mut rest: &mut [u8] = match &mut self.map {
            Some(map) => &mut map[..],
            None => &mut [],
        };
        let mut slots = Vec::with_capacity(self.sizes.len());
        for &size in &self.sizes {
            let (slot, tail) = std::mem::take(&mut rest).split_at_mut(size.next_multiple_of(ALIGN));
            slots.push(&mut slot[..size]);
            rest = tail;
        }
        slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_disjoint_and_sized() {
        let sizes = vec![3, 0, 64, 100];
        let mut a = Arena::with_sizes(sizes.clone()).unwrap();
        let slots: Vec<(usize, usize)> = a
            .slots()
            .into_iter()
            .map(|s| {
                s.fill(0xab);
                (s.as_ptr() as usize, s.len())
            })
            .collect();
        assert_eq!(slots.iter().map(|s| s.1).collect::<Vec<_>>(), sizes);
        for w in slots.windows(2) {
            assert_eq!(w[0].0 % ALIGN, 0);
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
        assert!(Arena::with_sizes(vec![0, 0])
            .unwrap()
            .slots()
            .iter()
            .all(|s| s.is_empty()));
    }
}
