// Command etcd is the upstream etcd server (go.etcd.io/etcd/server/v3/etcdmain), built here because
// etcd's own main package lives in a module (go.etcd.io/etcd/v3) that is not meant to be required.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
