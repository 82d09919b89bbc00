//! A bound on what a `pytorch_model.bin` pickle may build, checked before candle reads it.
//!
//! candle's pickle reader builds every object as a Rust value: nesting is recursion when the
//! value is cloned or dropped, and every memo lookup copies the whole object. A pickle that nests
//! lists a million deep overflows the stack (the process aborts), and one that fetches a large
//! object from the memo many times exhausts memory. A PyTorch state dict nests a handful of
//! levels and copies little, so this module replays the opcodes candle understands on the
//! *shape* of each object only (its depth and its size) and refuses the file before candle runs
//! when either bound is passed. The replay is a loop over the bytes, with no recursion.
//!
//! Anything the replay does not understand (an unknown opcode, a stack underflow, a missing memo
//! entry) is left to candle, which reports it as an unreadable checkpoint.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Deepest nesting accepted (a state dict of tensors nests about 6 levels).
pub const MAX_DEPTH: u32 = 1_000;

/// Most objects the pickle may create in all, counting every copy a memo lookup makes.
pub const MAX_OBJECTS: u64 = 100_000_000;

/// Refuses `file` (a zip written by `torch.save`) when one of its pickles nests deeper than
/// [`MAX_DEPTH`] or creates more than [`MAX_OBJECTS`] objects.
pub fn check_checkpoint(file: &Path) -> Result<()> {
    let shown = file.display();
    let reader = std::fs::File::open(file).with_context(|| format!("cannot open {shown}"))?;
    // Not a zip: candle reports that itself.
    let Ok(mut zip) = zip::ZipArchive::new(std::io::BufReader::new(reader)) else {
        return Ok(());
    };
    for i in 0..zip.len() {
        let Ok(mut entry) = zip.by_index(i) else {
            continue;
        };
        if !entry.name().is_ok_and(|n| n.ends_with("data.pkl")) {
            continue;
        }
        let mut bytes = Vec::new();
        if entry.read_to_end(&mut bytes).is_err() {
            continue;
        }
        check_pickle(&bytes).with_context(|| {
            format!("{shown}: not a PyTorch state dict; re-save it with torch.save(state_dict) or as model.safetensors")
        })?;
    }
    Ok(())
}

/// The shape of one object on the pickle stack.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    /// A `MARK`.
    Mark,
    /// An object nesting `depth` levels and holding `size` objects in all.
    Object { depth: u32, size: u64 },
}

const LEAF: Shape = Shape::Object { depth: 1, size: 1 };

impl Shape {
    fn parts(self) -> (u32, u64) {
        match self {
            Shape::Mark => (0, 1),
            Shape::Object { depth, size } => (depth, size),
        }
    }

    /// A container holding `self` and `children`.
    fn holding(self, children: &[Shape]) -> Shape {
        let (mut depth, mut size) = self.parts();
        for child in children {
            let (d, s) = child.parts();
            depth = depth.max(d.saturating_add(1));
            size = size.saturating_add(s);
        }
        Shape::Object { depth, size }
    }
}

/// Why the replay stopped early without a verdict: candle will report the problem.
struct Unreadable;

/// The replay's state: the stack, the memo and the objects made so far.
#[derive(Default)]
struct Replay {
    stack: Vec<Shape>,
    memo: HashMap<u32, Shape>,
    made: u64,
}

impl Replay {
    fn push(&mut self, shape: Shape) -> Result<()> {
        let (depth, size) = shape.parts();
        self.made = self.made.saturating_add(1);
        if depth > MAX_DEPTH {
            bail!("its pickle nests objects more than {MAX_DEPTH} deep");
        }
        if self.made > MAX_OBJECTS || size > MAX_OBJECTS {
            bail!("its pickle builds more than {MAX_OBJECTS} objects");
        }
        self.stack.push(shape);
        Ok(())
    }

    fn pop(&mut self) -> std::result::Result<Shape, Unreadable> {
        self.stack.pop().ok_or(Unreadable)
    }

    fn pop_n(&mut self, n: usize) -> std::result::Result<Vec<Shape>, Unreadable> {
        let at = self.stack.len().checked_sub(n).ok_or(Unreadable)?;
        Ok(self.stack.split_off(at))
    }

    fn pop_to_mark(&mut self) -> std::result::Result<Vec<Shape>, Unreadable> {
        let mark = self
            .stack
            .iter()
            .rposition(|s| *s == Shape::Mark)
            .ok_or(Unreadable)?;
        let objects = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(objects)
    }

    /// Replaces the top of the stack by the container it is, now also holding `children`.
    fn extend_top(&mut self, children: &[Shape]) -> Result<Option<Unreadable>> {
        let Ok(top) = self.pop() else {
            return Ok(Some(Unreadable));
        };
        self.made = self.made.saturating_sub(1);
        self.push(top.holding(children))?;
        Ok(None)
    }

    /// Replaces the top `n` objects by one container holding them.
    fn combine(&mut self, n: usize) -> Result<Option<Unreadable>> {
        let Ok(parts) = self.pop_n(n) else {
            return Ok(Some(Unreadable));
        };
        self.push(LEAF.holding(&parts))?;
        Ok(None)
    }
}

/// Replays the opcodes of candle's reader on shapes; errors only when a bound is passed.
pub fn check_pickle(bytes: &[u8]) -> Result<()> {
    let mut r = Bytes { rest: bytes };
    let mut state = Replay::default();
    while let Some(op) = r.take(1).map(|b| b[0]) {
        match step(op, &mut r, &mut state)? {
            Step::Next => {}
            Step::Stop | Step::Unreadable => return Ok(()),
        }
    }
    Ok(())
}

enum Step {
    Next,
    Stop,
    Unreadable,
}

/// The input still to read.
struct Bytes<'a> {
    rest: &'a [u8],
}

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        (self.rest.len() >= n).then(|| {
            let (head, tail) = self.rest.split_at(n);
            self.rest = tail;
            head
        })
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Skips `n` bytes.
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    /// Skips one line (a `GLOBAL` argument).
    fn line(&mut self) -> Option<()> {
        let end = self.rest.iter().position(|&b| b == b'\n')?;
        self.rest = &self.rest[end + 1..];
        Some(())
    }
}

/// One opcode, with the effect candle's reader gives it.
fn step(op: u8, r: &mut Bytes, s: &mut Replay) -> Result<Step> {
    let outcome = |u: Option<Unreadable>| match u {
        None => Step::Next,
        Some(Unreadable) => Step::Unreadable,
    };
    Ok(match op {
        b'.' => Step::Stop,
        0x80 => match r.skip(1) {
            Some(()) => Step::Next,
            None => Step::Unreadable,
        },
        b'c' => {
            if r.line().and_then(|_| r.line()).is_none() {
                return Ok(Step::Unreadable);
            }
            s.push(LEAF)?;
            Step::Next
        }
        b'K' | b'M' | b'J' | b'G' => {
            let width = match op {
                b'K' => 1,
                b'M' => 2,
                b'J' => 4,
                _ => 8,
            };
            if r.skip(width).is_none() {
                return Ok(Step::Unreadable);
            }
            s.push(LEAF)?;
            Step::Next
        }
        0x8a => {
            let Some(n) = r.take(1).map(|b| usize::from(b[0])) else {
                return Ok(Step::Unreadable);
            };
            if r.skip(n).is_none() {
                return Ok(Step::Unreadable);
            }
            s.push(LEAF)?;
            Step::Next
        }
        b'X' => {
            let Some(n) = r.u32() else {
                return Ok(Step::Unreadable);
            };
            if r.skip(n as usize).is_none() {
                return Ok(Step::Unreadable);
            }
            s.push(LEAF)?;
            Step::Next
        }
        b'(' => {
            s.push(Shape::Mark)?;
            Step::Next
        }
        b')' | b']' | b'}' | b'd' | b'N' | 0x88 | 0x89 => {
            s.push(LEAF)?;
            Step::Next
        }
        b'Q' => outcome(s.combine(1)?),
        0x85 => outcome(s.combine(1)?),
        0x86 | b'R' | b'b' | 0x81 => outcome(s.combine(2)?),
        0x87 => outcome(s.combine(3)?),
        b't' => match s.pop_to_mark() {
            Ok(parts) => {
                s.push(LEAF.holding(&parts))?;
                Step::Next
            }
            Err(Unreadable) => Step::Unreadable,
        },
        b'a' => match s.pop() {
            Ok(value) => outcome(s.extend_top(&[value])?),
            Err(Unreadable) => Step::Unreadable,
        },
        b's' => match s.pop_n(2) {
            Ok(pair) => outcome(s.extend_top(&pair)?),
            Err(Unreadable) => Step::Unreadable,
        },
        b'e' | b'u' => match s.pop_to_mark() {
            Ok(parts) => outcome(s.extend_top(&parts)?),
            Err(Unreadable) => Step::Unreadable,
        },
        b'h' | b'j' => {
            let id = match op {
                b'h' => r.take(1).map(|b| u32::from(b[0])),
                _ => r.u32(),
            };
            let Some(shape) = id.and_then(|id| s.memo.get(&id).copied()) else {
                return Ok(Step::Unreadable);
            };
            let (_, size) = shape.parts();
            s.made = s.made.saturating_add(size.saturating_sub(1));
            s.push(shape)?;
            Step::Next
        }
        b'q' | b'r' => {
            let id = match op {
                b'q' => r.take(1).map(|b| u32::from(b[0])),
                _ => r.u32(),
            };
            let (Some(id), Some(&top)) = (id, s.stack.last()) else {
                return Ok(Step::Unreadable);
            };
            let (_, size) = top.parts();
            s.made = s.made.saturating_add(size);
            if s.made > MAX_OBJECTS {
                bail!("its pickle builds more than {MAX_OBJECTS} objects");
            }
            s.memo.insert(id, top);
            Step::Next
        }
        _ => Step::Unreadable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `depth` empty lists, each appended into the one below it.
    fn nested_lists(depth: usize) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', depth));
        p.extend(std::iter::repeat_n(b'a', depth - 1));
        p.push(b'.');
        p
    }

    #[test]
    fn a_state_dict_shaped_pickle_passes() {
        // {'w': (1, [2, 3])} with a memo put and get.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00wK\x01]q\x01(K\x02K\x03e\x86u.";
        check_pickle(p).unwrap();
        check_pickle(&nested_lists(50)).unwrap();
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing() {
        let err = check_pickle(&nested_lists(1_000_000)).unwrap_err();
        assert!(
            err.to_string()
                .contains("nests objects more than 1000 deep"),
            "{err}"
        );
        assert!(check_pickle(&nested_lists(MAX_DEPTH as usize)).is_ok());
        assert!(check_pickle(&nested_lists(MAX_DEPTH as usize + 1)).is_err());
    }

    #[test]
    fn nesting_through_the_memo_counts_too() {
        // Each round: x = [x] via the memo, so the stack stays two deep.
        let mut p = vec![b']', b'q', 0];
        for _ in 0..2_000 {
            p.extend([b']', b'h', 0, b'a', b'q', 0]);
        }
        let err = check_pickle(&p).unwrap_err();
        assert!(err.to_string().contains("deep"), "{err}");
    }

    #[test]
    fn copying_a_large_object_from_the_memo_many_times_is_refused() {
        let mut p = vec![b']', b'('];
        p.extend(std::iter::repeat_n(b'N', 100_000));
        p.extend([b'e', b'q', 0]);
        for _ in 0..2_000 {
            p.extend([b'h', 0]);
        }
        let err = check_pickle(&p).unwrap_err();
        assert!(err.to_string().contains("objects"), "{err}");
    }

    #[test]
    fn what_candle_rejects_is_left_to_candle() {
        for p in [&b"a"[..], b"\xff", b"h\x07", b"X\xff\xff\xff\xff", b"t"] {
            check_pickle(p).unwrap();
        }
    }
}
