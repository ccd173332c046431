module ringmaster/placement/tools/gorand

go 1.21
