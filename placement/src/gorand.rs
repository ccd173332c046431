//! Bit-exact port of Go's `math/rand` seeded source (the additive lagged Fibonacci
//! generator) and the `Rand` methods the FGD simulator draws from. The paper's results
//! depend on every draw, so each method mirrors Go's arithmetic, including its rejection
//! loops; `tests/fixtures/gorand.txt` holds reference draws printed by `tools/gorand`.

use crate::gorand_cooked::RNG_COOKED;

const RNG_LEN: usize = 607;
const RNG_TAP: usize = 273;
const INT32_MAX: i64 = (1 << 31) - 1;

/// Go's `rand.New(rand.NewSource(seed))`.
#[derive(Clone)]
pub struct GoRand {
    tap: usize,
    feed: usize,
    vec: Box<[i64; RNG_LEN]>,
}

fn seedrand(x: i32) -> i32 {
    const A: i32 = 48271;
    const Q: i32 = 44488;
    const R: i32 = 3399;
    let hi = x / Q;
    let lo = x % Q;
    let mut x = A.wrapping_mul(lo).wrapping_sub(R.wrapping_mul(hi));
    if x < 0 {
        x = x.wrapping_add(INT32_MAX as i32);
    }
    x
}

impl GoRand {
    pub fn new(seed: i64) -> Self {
        let mut seed = seed % INT32_MAX;
        if seed < 0 {
            seed += INT32_MAX;
        }
        if seed == 0 {
            seed = 89_482_311;
        }
        let mut vec = Box::new([0i64; RNG_LEN]);
        let mut x = seed as i32;
        for i in -20i32..RNG_LEN as i32 {
            x = seedrand(x);
            if i >= 0 {
                let mut u = i64::from(x) << 40;
                x = seedrand(x);
                u ^= i64::from(x) << 20;
                x = seedrand(x);
                u ^= i64::from(x);
                u ^= RNG_COOKED[i as usize];
                vec[i as usize] = u;
            }
        }
        GoRand {
            tap: 0,
            feed: RNG_LEN - RNG_TAP,
            vec,
        }
    }

    pub fn uint64(&mut self) -> u64 {
        self.tap = if self.tap == 0 {
            RNG_LEN - 1
        } else {
            self.tap - 1
        };
        self.feed = if self.feed == 0 {
            RNG_LEN - 1
        } else {
            self.feed - 1
        };
        let x = self.vec[self.feed].wrapping_add(self.vec[self.tap]);
        self.vec[self.feed] = x;
        x as u64
    }

    pub fn int63(&mut self) -> i64 {
        (self.uint64() & (u64::MAX >> 1)) as i64
    }

    pub fn int(&mut self) -> i64 {
        self.int63()
    }

    fn int31(&mut self) -> i32 {
        (self.int63() >> 32) as i32
    }

    fn uint32(&mut self) -> u32 {
        (self.int63() >> 31) as u32
    }

    pub fn int63n(&mut self, n: i64) -> i64 {
        assert!(n > 0, "int63n of {n}");
        if n & (n - 1) == 0 {
            return self.int63() & (n - 1);
        }
        let max = ((1u64 << 63) - 1 - (1u64 << 63) % n as u64) as i64;
        let mut v = self.int63();
        while v > max {
            v = self.int63();
        }
        v % n
    }

    pub fn int31n(&mut self, n: i32) -> i32 {
        assert!(n > 0, "int31n of {n}");
        if n & (n - 1) == 0 {
            return self.int31() & (n - 1);
        }
        let max = ((1u32 << 31) - 1 - (1u32 << 31) % n as u32) as i32;
        let mut v = self.int31();
        while v > max {
            v = self.int31();
        }
        v % n
    }

    /// Lemire's multiply-shift reduction; Go uses it only inside `Shuffle`.
    fn int31n_lemire(&mut self, n: i32) -> i32 {
        let n = n as u32;
        let mut prod = u64::from(self.uint32()) * u64::from(n);
        let mut low = prod as u32;
        if low < n {
            let thresh = n.wrapping_neg() % n;
            while low < thresh {
                prod = u64::from(self.uint32()) * u64::from(n);
                low = prod as u32;
            }
        }
        (prod >> 32) as i32
    }

    pub fn intn(&mut self, n: usize) -> usize {
        if n <= INT32_MAX as usize {
            self.int31n(n as i32) as usize
        } else {
            self.int63n(n as i64) as usize
        }
    }

    pub fn float64(&mut self) -> f64 {
        loop {
            let f = self.int63() as f64 / (1u64 << 63) as f64;
            if f != 1.0 {
                return f;
            }
        }
    }

    pub fn perm(&mut self, n: usize) -> Vec<usize> {
        let mut m = vec![0; n];
        for i in 0..n {
            let j = self.intn(i + 1);
            m[i] = m[j];
            m[j] = i;
        }
        m
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        // Slices here never exceed 2^31 elements, so Go's Int63n branch never runs.
        for i in (1..items.len()).rev() {
            let j = self.int31n_lemire((i + 1) as i32) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GoRand;

    /// Replays the calls of `tools/gorand/main.go` and compares every printed draw.
    #[test]
    fn matches_go_reference_draws() {
        let text = include_str!("../tests/fixtures/gorand.txt");
        let mut rng = GoRand::new(0);
        let mut checked = 0;
        for line in text.lines() {
            let (kind, rest) = line.split_once(' ').unwrap();
            let got = match kind {
                "seed" => {
                    rng = GoRand::new(rest.parse().unwrap());
                    continue;
                }
                "int63" => rng.int63().to_string(),
                "int" => rng.int().to_string(),
                "intn" => {
                    let (n, _) = rest.split_once(' ').unwrap();
                    format!("{n} {}", rng.intn(n.parse().unwrap()))
                }
                "int63n" => rng.int63n((1 << 40) + 3).to_string(),
                "float64" => format!("{:?}", rng.float64()),
                "perm" => format!("{:?}", rng.perm(12)).replace(',', ""),
                "shuffle" => {
                    let mut s: Vec<usize> = (0..15).collect();
                    rng.shuffle(&mut s);
                    format!("{s:?}").replace(',', "")
                }
                other => panic!("unknown fixture line {other}"),
            };
            assert_eq!(got, rest, "draw {kind}");
            checked += 1;
        }
        assert!(checked > 50);
    }
}
