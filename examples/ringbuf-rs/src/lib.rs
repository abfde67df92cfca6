//! A fixed-capacity ring buffer of `i64` samples with a running average.

pub struct Ring {
    data: Vec<i64>,
    head: usize, // index of the oldest sample
    tail: usize, // index where the next sample goes
    full: bool,
}

impl Ring {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a ring needs room for at least one sample");
        Ring { data: vec![0; capacity], head: 0, tail: 0, full: false }
    }

    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        if self.full {
            self.capacity()
        } else {
            self.tail - self.head
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a sample, overwriting the oldest one when full.
    pub fn push(&mut self, value: i64) {
        self.data[self.tail] = value;
        self.tail = (self.tail + 1) % self.capacity();
        if self.full {
            self.head = self.tail;
        }
        self.full = self.tail == self.head;
    }

    /// Removes and returns the oldest sample.
    pub fn pop(&mut self) -> Option<i64> {
        if self.is_empty() {
            return None;
        }
        let value = self.data[self.head];
        self.head = (self.head + 1) % self.capacity();
        self.full = false;
        Some(value)
    }

    /// Mean of the samples held, rounded toward zero.
    pub fn average(&self) -> Option<i64> {
        if self.is_empty() {
            return None;
        }
        let sum: i64 = (0..self.len()).map(|i| self.data[(self.head + i) % self.capacity()]).sum();
        Some(sum / self.len() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::Ring;

    #[test]
    fn keeps_the_newest_samples() {
        let mut ring = Ring::new(3);
        for v in 1..=5 {
            ring.push(v);
        }
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.average(), Some(4));
    }

    #[test]
    fn length_after_wrapping_and_popping() {
        let mut ring = Ring::new(4);
        for v in 0..6 {
            ring.push(v);
        }
        assert_eq!(ring.pop(), Some(2));
        assert_eq!(ring.pop(), Some(3));
        ring.push(10);
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.average(), Some((4 + 5 + 10) / 3));
    }

    #[test]
    fn pop_until_empty() {
        let mut ring = Ring::new(2);
        ring.push(7);
        assert_eq!(ring.pop(), Some(7));
        assert_eq!(ring.pop(), None);
        assert!(ring.is_empty());
    }
}
