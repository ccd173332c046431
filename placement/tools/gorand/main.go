// Prints reference draws of Go's math/rand (seeded source) for the Rust port's test.
// Run: go run . > ../../tests/fixtures/gorand.txt
package main

import (
	"fmt"
	"math/rand"
)

func main() {
	for _, seed := range []int64{42, 51, 0, -7, 1 << 40} {
		r := rand.New(rand.NewSource(seed))
		fmt.Printf("seed %d\n", seed)
		for i := 0; i < 3; i++ {
			fmt.Printf("int63 %d\n", r.Int63())
		}
		fmt.Printf("int %d\n", r.Int())
		for _, n := range []int{1, 2, 3, 7, 100, 1213, 8152, 1 << 20, 1<<31 - 1} {
			fmt.Printf("intn %d %d\n", n, r.Intn(n))
		}
		fmt.Printf("int63n %d\n", r.Int63n(1<<40+3))
		for i := 0; i < 3; i++ {
			fmt.Printf("float64 %v\n", r.Float64())
		}
		fmt.Printf("perm %v\n", r.Perm(12))
		s := make([]int, 15)
		for i := range s {
			s[i] = i
		}
		r.Shuffle(len(s), func(i, j int) { s[i], s[j] = s[j], s[i] })
		fmt.Printf("shuffle %v\n", s)
		fmt.Printf("int %d\n", r.Int())
	}
}
